"""Small models for the bundled tasks: a pre-norm ViT for digits and a character-level GPT.

Every projection inside the transformer blocks (attention ``qkv`` / ``proj`` and MLP ``fc1`` / ``fc2``) is a
plain ``nn.Linear``, so ``sparsify_`` and ``DiagSparsifier`` can convert it; embeddings, the classifier head
and the GPT output layer stay dense (:func:`sparse_filter` selects exactly the block linears).

Models are built from frozen configs with plain fields (:class:`ViTConfig`, :class:`GPTConfig`);
``config.to_dict()`` / ``model_from_dict`` round-trip them through checkpoints that ``torch.load(...,
weights_only=True)`` can read.

Default sizes (chosen so a digits run takes ~10-30 s and a chars run ~2-4 min on 2 CPU cores, and every
converted layer reaches 95% sparsity with ``k >= 2`` diagonals — see ``tests/test_models.py``):

=========  =====  =====  =====  ====  ===========================================  ==========
model      dim    depth  heads  mlp   converted layers (out x in)                  params
=========  =====  =====  =====  ====  ===========================================  ==========
ViT        64     3      4      4x    qkv 192x64, proj 64x64, fc1 256x64, fc2 64x256  ~152 k
GPT        128    4      4      4x    qkv 384x128, proj 128x128, fc1 512x128, ...     ~818 k
=========  =====  =====  =====  ====  ===========================================  ==========
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ViTConfig",
    "GPTConfig",
    "DigitsViT",
    "CharGPT",
    "build_model",
    "model_from_dict",
    "sparse_filter",
    "SPARSE_LAYER_NAMES",
]

#: Names (last FQN component) of the linears a sparsifier may convert.
SPARSE_LAYER_NAMES = ("qkv", "proj", "fc1", "fc2")


def _check_transformer(cfg: Any, *positive: str) -> None:
    """The checks both model configs share: the ``positive`` int fields, ``dim % heads``, ``dropout``."""
    name = type(cfg).__name__
    for n in positive:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}.{n} must be a positive int, got {v!r}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"{name}.dim={cfg.dim} must be divisible by heads={cfg.heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"{name}.dropout={cfg.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class ViTConfig:
    """A small pre-norm ViT over ``n_tokens`` patch tokens of ``patch_dim`` features (digits: 16 x 4)."""

    n_tokens: int = 16
    patch_dim: int = 4
    n_classes: int = 10
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    kind = "vit"

    def __post_init__(self) -> None:
        _check_transformer(self, "n_tokens", "patch_dim", "n_classes", "dim", "depth", "heads", "mlp_ratio")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class GPTConfig:
    """A small decoder-only transformer over a character vocabulary with a context of ``block_size``."""

    vocab_size: int = 97
    block_size: int = 128
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    kind = "gpt"

    def __post_init__(self) -> None:
        _check_transformer(self, "vocab_size", "block_size", "dim", "depth", "heads", "mlp_ratio")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


# ----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with ``qkv`` and ``proj`` as ``nn.Linear`` (so they can be sparsified)."""

    def __init__(self, dim: int, heads: int, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, dim) -> (B, L, dim)``."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02) for linears/embeddings, residual projections scaled by ``1/sqrt(2 n_layers)``."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj", "mlp.fc2")) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


class DigitsViT(nn.Module):
    """``(B, n_tokens, patch_dim)`` float -> ``(B, n_classes)`` logits. A learned [CLS] token is prepended."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"DigitsViT expects a ViTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.embed = nn.Linear(c.patch_dim, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_tokens + 1, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, False, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.n_classes)
        _init_weights(self, c.depth)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 3 or x.shape[1:] != (c.n_tokens, c.patch_dim):
            raise ValueError(f"DigitsViT expects (B, {c.n_tokens}, {c.patch_dim}) input, got {tuple(x.shape)}")
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = self.drop(h)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0]))

    def example_input(self, batch: int = 2) -> tuple[Tensor]:
        return (torch.randn(batch, self.config.n_tokens, self.config.patch_dim),)


class CharGPT(nn.Module):
    """``(B, L)`` int64 token ids (``L <= block_size``) -> ``(B, L, vocab_size)`` next-token logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"CharGPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.block_size, c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, True, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        # Not tied to tok_embed: a tied weight could not be handled (sparsified, exported) independently.
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        _init_weights(self, c.depth)

    def forward(self, idx: Tensor) -> Tensor:
        c = self.config
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CharGPT expects (B, L) integer token ids, got {idx.dtype} {tuple(idx.shape)}")
        L = idx.shape[1]
        if L > c.block_size:
            raise ValueError(f"CharGPT: sequence length {L} exceeds block_size={c.block_size}")
        pos = torch.arange(L, device=idx.device)
        h = self.drop(self.tok_embed(idx) + self.pos_embed(pos))
        for blk in self.blocks:
            h = blk(h)
        return self.lm_head(self.norm(h))

    def example_input(self, batch: int = 2) -> tuple[Tensor]:
        return (torch.randint(0, self.config.vocab_size, (batch, self.config.block_size)),)


# ----------------------------------------------------------------------------------------------------
def sparse_filter(module: nn.Module, fqn: str) -> bool:
    """``filter_fn`` for ``sparsify_`` / ``DiagSparsifier``: the ``nn.Linear``s inside transformer blocks.

    Keeps the patch/token embeddings, the classifier head and the GPT output layer dense.
    """
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.") and fqn.rsplit(".", 1)[-1] in SPARSE_LAYER_NAMES


def build_model(config: ViTConfig | GPTConfig) -> DigitsViT | CharGPT:
    """The model for a config (uses torch's global RNG for the initial weights)."""
    if isinstance(config, ViTConfig):
        return DigitsViT(config)
    if isinstance(config, GPTConfig):
        return CharGPT(config)
    raise TypeError(f"build_model expects a ViTConfig or GPTConfig, got {type(config).__name__}")


def config_from_dict(d: dict) -> ViTConfig | GPTConfig:
    """Inverse of ``config.to_dict()``; unknown keys are an error (they would be silently dropped)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"model config dict must have a 'kind' key, got {d!r}")
    d = dict(d)
    kind = d.pop("kind")
    cls = {"vit": ViTConfig, "gpt": GPTConfig}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r} (expected 'vit' or 'gpt')")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


def model_from_dict(d: dict) -> DigitsViT | CharGPT:
    """Build a model from ``config.to_dict()`` (as stored in checkpoints)."""
    return build_model(config_from_dict(d))
