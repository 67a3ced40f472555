"""Models and references shared by the pass tests.

``make_net`` covers every way a user reaches a marked linear: ``nn.Linear``, a user subclass of it
(``symbolic_trace`` traces through it, Dynamo inlines it), ``F.linear`` on a bare marked parameter, nested
in a ``ModuleList`` of blocks, wide and tall shapes, with and without bias, next to an unmarked linear.
The reference for every numeric check is the *dense* model whose marked weights are masked to the same
diagonals (``diagcompile.testing.masked_dense_copy`` / ``masked_training_copy``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagcompile import mark_sparse


class Sub(nn.Linear):
    """A user subclass of nn.Linear (not a torch.nn leaf: the tracers go through its forward)."""


class FunctionalHead(nn.Module):
    """``F.linear`` on a bare 2-D parameter, no bias."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)  # tall: h > d
        self.fc2 = Sub(h, d)  # wide
        self.skip = nn.Linear(d, d, bias=False)  # never marked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x))) + self.skip(x)


class Net(nn.Module):
    """Two nested blocks and a functional head: 5 marked sites, 2 unmarked linears."""

    def __init__(self, d: int = 12, h: int = 20, n_out: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, h), Block(d, h)])
        self.head = FunctionalHead(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


NET_SITES = 5


def make_net(mark: bool = True, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    if mark:
        for b in net.blocks:
            mark_sparse(b.fc1, sparsity=0.75)  # top-k by norm
            mark_sparse(b.fc2, offsets=[0, 3, 7, 19])  # explicit diagonals
        mark_sparse(net.head.w, sparsity=0.5)
    return net


class TiedNet(nn.Module):
    """An encoder and a decoder sharing one weight (both marked)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.enc = nn.Linear(d, d)
        self.dec = nn.Linear(d, d)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def make_tied(seed: int = 0) -> TiedNet:
    torch.manual_seed(seed)
    net = TiedNet()
    mark_sparse(net.enc, sparsity=0.75)
    mark_sparse(net.dec, sparsity=0.75)
    return net


class Chain(nn.Module):
    """Marked linears fed straight from other marked linears: ``fc1 -> fc2`` back to back, ``fc2 -> fc3``
    through a reshape, ``fc3 -> fc4`` through a reshape, and ``fc4``'s output read twice (by the marked
    ``F.linear`` head and by a sum). Rewriting one site replaces the node the next site reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(6, 6, bias=False)
        self.fc4 = nn.Linear(12, 12)
        self.w = nn.Parameter(torch.randn(4, 12) / 12**0.5)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.fc1(x))
        h = self.fc3(h.unflatten(-1, (2, 6))).flatten(-2)
        h = self.fc4(h)
        return F.linear(h, self.w, self.b) + h.sum(-1, keepdim=True)


CHAIN_SITES = 5


def make_chain(seed: int = 0) -> Chain:
    torch.manual_seed(seed)
    net = Chain()
    for fc in (net.fc1, net.fc2, net.fc3, net.fc4):
        mark_sparse(fc, sparsity=0.5)
    mark_sparse(net.w, sparsity=0.5)
    return net


@pytest.fixture
def zoo() -> SimpleNamespace:
    """The model classes and factories above (test modules cannot import this conftest)."""
    return SimpleNamespace(
        Sub=Sub,
        FunctionalHead=FunctionalHead,
        Block=Block,
        Net=Net,
        TiedNet=TiedNet,
        make_net=make_net,
        make_tied=make_tied,
        NET_SITES=NET_SITES,
        make_chain=make_chain,
        CHAIN_SITES=CHAIN_SITES,
    )


@pytest.fixture(params=["inline", "op"])
def graph_form(request, monkeypatch):
    """Run a backend test both ways: small layers inlined as plain ops (the default for the zoo's tiny CPU
    layers) and every layer an op call, as larger layers compile."""
    if request.param == "op":
        monkeypatch.setattr("diagcompile.passes.inline.inline_in_graph", lambda *args: False)
    return request.param
