"""rewrite_traced: torch.fx.symbolic_trace graphs (call_module and F.linear on get_attr weights)."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from diagcompile import DiagSparsityConfig, get_sparse_mark, mark_sparse, sparsify_
from diagcompile.ops import extract_diagonals
from diagcompile.passes import SparseRewriteError, rewrite_traced
from diagcompile.testing import masked_dense_copy

DIAG = torch.ops.diagcompile.diag_linear.default


def _linear_nodes(gm: fx.GraphModule) -> int:
    mods = dict(gm.named_modules())
    return sum(
        (n.op == "call_function" and n.target is F.linear)
        or (n.op == "call_module" and isinstance(mods.get(n.target), nn.Linear))
        for n in gm.graph.nodes
    )


def _diag_nodes(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is DIAG for n in gm.graph.nodes)


def test_counts_numerics_and_state_layout(zoo):
    net = zoo.make_net()
    ref = masked_dense_copy(net)
    traced = fx.symbolic_trace(net)
    linears_before = _linear_nodes(traced)
    gm, report = rewrite_traced(traced)

    assert report.count == zoo.NET_SITES == _diag_nodes(gm)
    assert _linear_nodes(gm) == linears_before - zoo.NET_SITES == 2  # the two unmarked skips stay dense
    assert set(report.weights) == {
        "blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight", "blocks.1.fc2.weight", "head.w",
    }  # fmt: skip
    for x in (torch.randn(1, 12), torch.randn(3, 5, 12)):
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)

    # Dense weights are gone from the graph module; the diagonal state sits where they lived.
    sd = gm.state_dict()
    assert not any(k.endswith(("fc1.weight", "fc2.weight", "head.w")) for k in sd)
    assert sd["blocks.0.fc2.offsets"].tolist() == [0, 3, 7, 19] and sd["blocks.0.fc2.offsets"].dtype == torch.int32
    assert sd["blocks.0.fc1.values"].shape == (5, 12)  # 20x12 at 75%: k = 5 of P = 20, D = 12
    assert sd["head.w_values"].shape == (6, 6) and "head.w_offsets" in sd
    off = sd["blocks.1.fc1.offsets"]
    assert torch.equal(sd["blocks.1.fc1.values"], extract_diagonals(net.blocks[1].fc1.weight.detach(), off))


def test_state_dict_loads_into_sparsify(zoo):
    """The rewritten graph module and sparsify_(model) share one state_dict layout (DiagLinear's)."""
    net = zoo.make_net()
    gm, _ = rewrite_traced(fx.symbolic_trace(net))
    with torch.no_grad():  # make the graph module's values differ from what sparsify_ would pick
        for name, p in gm.named_parameters():
            if name.endswith("values"):
                p.mul_(2)
    diag_keys = {k for k in gm.state_dict() if k.endswith(("values", "offsets"))}
    sparsify_(net, DiagSparsityConfig(only_marked=True))
    result = net.load_state_dict(gm.state_dict(), strict=False)
    # Only the functional head has no DiagLinear counterpart (sparsify_ converts modules).
    assert set(result.unexpected_keys) == {"head.w_values", "head.w_offsets"}
    assert set(result.missing_keys) == {"head.w"}
    assert diag_keys - set(result.unexpected_keys) <= set(net.state_dict())
    assert torch.equal(net.blocks[0].fc1.values, gm.get_parameter("blocks.0.fc1.values"))


def test_user_model_is_not_modified(zoo):
    net = zoo.make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    gm, _ = rewrite_traced(fx.symbolic_trace(net))
    assert [type(m) for m in net.modules()] == types
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert gm.get_submodule("blocks.0.fc1") is not net.blocks[0].fc1
    # Untouched state stays shared, as with symbolic_trace itself.
    assert gm.get_submodule("blocks.0.skip") is net.blocks[0].skip
    assert gm.get_parameter("blocks.0.fc1.bias") is net.blocks[0].fc1.bias


def test_trains_the_compact_values(zoo):
    """The optimizer of the rewritten module sees (k, D) values and no dense marked weight."""
    net = zoo.make_net()
    gm, _ = rewrite_traced(fx.symbolic_trace(net))
    names = dict(gm.named_parameters())
    assert not any(n.endswith(("fc1.weight", "fc2.weight", "head.w")) for n in names)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    x = torch.randn(4, 12)
    v0 = names["blocks.0.fc1.values"].detach().clone()
    loss = gm(x).square().mean()
    loss.backward()
    assert names["blocks.0.fc1.values"].grad.shape == v0.shape
    opt.step()
    assert not torch.equal(names["blocks.0.fc1.values"], v0)
    assert gm(x).square().mean() < loss


def test_nothing_marked_is_unchanged(zoo):
    traced = fx.symbolic_trace(zoo.make_net(mark=False))
    code = traced.code
    gm, report = rewrite_traced(traced)
    assert gm is traced and report.count == 0 and report.sites == () and gm.code == code


def test_marked_linears_fed_by_marked_linears(zoo):
    """Back to back, through reshapes, and an output read twice: each site reads the node that replaced
    the site before it (regression: the pass used the input recorded before that node was erased)."""
    net = zoo.make_chain()
    gm, report = rewrite_traced(fx.symbolic_trace(net))
    assert report.count == zoo.CHAIN_SITES == _diag_nodes(gm) and _linear_nodes(gm) == 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)


def test_tied_linears_share_one_state(zoo):
    net = zoo.make_tied()
    ref = masked_dense_copy(net)
    gm, report = rewrite_traced(fx.symbolic_trace(net))
    assert report.count == 2 and len(report.weights) == 1
    assert gm.get_parameter("enc.values") is gm.get_parameter("dec.values")
    assert gm.get_parameter("enc.bias") is not gm.get_parameter("dec.bias")
    x = torch.randn(3, 16)
    torch.testing.assert_close(gm(x), ref(x))


def test_tied_linears_marked_differently_are_rejected(zoo):
    net = zoo.TiedNet()
    mark_sparse(net.enc, sparsity=0.5)
    mark_sparse(net.dec, sparsity=0.75)
    with pytest.raises(SparseRewriteError, match="tied weight 'enc.weight'.*marked differently"):
        rewrite_traced(fx.symbolic_trace(net))


class _TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx))


class _MatmulUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t()


class _Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 2, self.bias)


class _Attn(nn.Module):
    """A marked linear hidden inside an opaque leaf (``nn.MultiheadAttention`` reads ``out_proj`` by attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize(
    "build, match",
    [
        ("embedding", r"'emb.weight' is marked sparse but is used inside 'emb' \(Embedding\).*untie it"),
        ("matmul", r"weight 'w' is marked sparse but node .*(t|matmul).* uses it other than as the weight"),
        ("scaled", r"weight 'fc.weight' is marked sparse but node .*mul.* uses it"),
        ("leaf", r"'attn.out_proj.weight' is marked sparse but is used inside 'attn' \(MultiheadAttention\)"),
    ],
)
def test_unrewritable_marks_raise(build, match):
    if build == "embedding":
        model = _TiedEmbedding()
        mark_sparse(model.out, sparsity=0.5)
    elif build == "matmul":
        model = _MatmulUse()
        mark_sparse(model.w, sparsity=0.5)
    elif build == "scaled":
        model = nn.Sequential()
        model.add_module("fc", _Scaled(8, 8))
        mark_sparse(model.fc, sparsity=0.5)
    else:
        model = _Attn()
        mark_sparse(model.attn.out_proj, sparsity=0.5)
    traced = fx.symbolic_trace(model)
    with pytest.raises(SparseRewriteError, match=match):
        rewrite_traced(traced)


def test_not_a_graph_module():
    with pytest.raises(TypeError, match="symbolic_trace"):
        rewrite_traced(nn.Linear(2, 2))


def test_module_mark_only_after_deepcopy(zoo):
    """A deep copy keeps the module marks only; call_module sites still find them."""
    import copy

    net = copy.deepcopy(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    mark_sparse(net[0], sparsity=0.5)
    clone = copy.deepcopy(net)
    assert get_sparse_mark(clone[0].weight) is None
    gm, report = rewrite_traced(fx.symbolic_trace(clone))
    assert report.count == 1
    x = torch.randn(2, 8)
    torch.testing.assert_close(gm(x), masked_dense_copy(net)(x))


def test_leaf_subclass_with_its_own_forward_raises():
    """A Linear subclass kept as a leaf but computing something else must not be replaced by a plain linear."""

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _Scaled) or super().is_leaf_module(m, qualname)

    model = nn.Sequential()
    model.add_module("fc", _Scaled(8, 8))
    mark_sparse(model.fc, sparsity=0.5)
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    with pytest.raises(SparseRewriteError, match=r"'fc'.*_Scaled overrides nn.Linear.forward"):
        rewrite_traced(gm)


def test_module_only_mark_inside_opaque_module_raises():
    """After a deepcopy only module marks survive; a marked linear hidden in a leaf is still reported."""
    import copy

    model = _Attn()
    mark_sparse(model.attn.out_proj, sparsity=0.5)
    clone = copy.deepcopy(model)
    assert get_sparse_mark(clone.attn.out_proj.weight) is None
    with pytest.raises(SparseRewriteError, match=r"'attn.out_proj.weight' is marked sparse"):
        rewrite_traced(fx.symbolic_trace(clone))
