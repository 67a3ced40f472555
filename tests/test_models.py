"""The small ViT / char-GPT: shapes, parameter counts, causality, which layers are sparsifiable."""

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, DiagSparsityConfig, sparsify_
from diagcompile.models import (
    CharGPT,
    DigitsViT,
    GPTConfig,
    ViTConfig,
    build_model,
    config_from_dict,
    model_from_dict,
    sparse_filter,
)
from diagcompile.ops import k_from_sparsity


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _block(d: int, r: int) -> int:
    # ln1, qkv, proj, ln2, fc1, fc2
    return 2 * d + _linear(d, 3 * d) + _linear(d, d) + 2 * d + _linear(d, r * d) + _linear(r * d, d)


def test_vit_param_count_and_shapes():
    c = ViTConfig()
    m = DigitsViT(c)
    expected = (
        _linear(c.patch_dim, c.dim)
        + c.dim  # cls token
        + (c.n_tokens + 1) * c.dim  # pos embed
        + c.depth * _block(c.dim, c.mlp_ratio)
        + 2 * c.dim  # final norm
        + _linear(c.dim, c.n_classes)
    )
    assert sum(p.numel() for p in m.parameters()) == expected
    (x,) = m.example_input(5)
    assert x.shape == (5, 16, 4)
    assert m(x).shape == (5, 10)


def test_gpt_param_count_and_shapes():
    c = GPTConfig()
    m = CharGPT(c)
    expected = (
        c.vocab_size * c.dim
        + c.block_size * c.dim
        + c.depth * _block(c.dim, c.mlp_ratio)
        + 2 * c.dim
        + _linear(c.dim, c.vocab_size, bias=False)
    )
    assert sum(p.numel() for p in m.parameters()) == expected
    (idx,) = m.example_input(3)
    assert idx.shape == (3, c.block_size) and idx.dtype == torch.int64
    assert m(idx).shape == (3, c.block_size, c.vocab_size)
    assert m(idx[:, :7]).shape == (3, 7, c.vocab_size)


def test_gpt_is_causal():
    m = CharGPT(GPTConfig(dim=32, depth=2, block_size=16)).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, b = m(idx), m(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_vit_is_permutation_sensitive():
    # The position embedding must make the token order matter (else patches were a bag of pixels).
    m = DigitsViT(ViTConfig(dim=32, depth=1)).eval()
    (x,) = m.example_input(2)
    assert not torch.allclose(m(x), m(x.flip(1)), atol=1e-4)


@pytest.mark.parametrize("model", [DigitsViT(ViTConfig()), CharGPT(GPTConfig())], ids=["vit", "gpt"])
def test_sparse_filter_selects_exactly_the_block_linears(model):
    selected = [fqn for fqn, m in model.named_modules() if sparse_filter(m, fqn)]
    depth = model.config.depth
    assert len(selected) == 4 * depth
    assert {s.rsplit(".", 1)[-1] for s in selected} == {"qkv", "proj", "fc1", "fc2"}
    dense_linears = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn not in selected]
    assert sorted(dense_linears) == sorted(["embed", "head"] if isinstance(model, DigitsViT) else ["lm_head"])


@pytest.mark.parametrize("config", [ViTConfig(), GPTConfig()], ids=["vit", "gpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_every_sparsity_is_reachable_on_every_converted_layer(config, sparsity):
    model = build_model(config)
    for fqn, m in model.named_modules():
        if not sparse_filter(m, fqn):
            continue
        n_out, n_in = m.weight.shape
        P, D = max(n_out, n_in), min(n_out, n_in)
        k = k_from_sparsity(n_out, n_in, sparsity)
        assert 2 <= k < P, (fqn, k, P)
        assert 1 - k / P >= sparsity - D / (n_out * n_in), fqn  # at most one diagonal short of the target


def test_sparsify_keeps_heads_and_embeddings_dense():
    model = build_model(GPTConfig(dim=32, depth=2, block_size=16))
    sparsify_(model, DiagSparsityConfig(sparsity=0.9), filter_fn=sparse_filter)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.tok_embed, nn.Embedding)
    assert all(isinstance(getattr(b.attn, n), DiagLinear) for b in model.blocks for n in ("qkv", "proj"))
    assert model(torch.randint(0, 97, (2, 16))).shape == (2, 16, 97)


def test_config_roundtrip_and_validation():
    for c in (ViTConfig(dim=48, depth=2), GPTConfig(block_size=32)):
        d = c.to_dict()
        assert config_from_dict(d) == c
        m = model_from_dict(d)
        assert m.config == c
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="positive int"):
        GPTConfig(depth=0)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        config_from_dict({"kind": "gpt", "width": 3})
    with pytest.raises(ValueError, match="unknown model kind"):
        config_from_dict({"kind": "cnn"})
    with pytest.raises(TypeError, match="ViTConfig or GPTConfig"):
        build_model({"kind": "vit"})


def test_bad_inputs_name_the_problem():
    vit = DigitsViT(ViTConfig(dim=32, depth=1))
    with pytest.raises(ValueError, match=r"\(B, 16, 4\)"):
        vit(torch.randn(2, 4, 16))
    gpt = CharGPT(GPTConfig(dim=32, depth=1, block_size=8))
    with pytest.raises(ValueError, match="exceeds block_size"):
        gpt(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer token ids"):
        gpt(torch.zeros(1, 4))
