"""rewrite_dynamo on real Dynamo graphs, run eagerly (the backend tests add Inductor on top).

A capturing backend hands us Dynamo's ``(gm, example_inputs)``; the rewritten graph module is then called
with the same inputs plus its diagonal inputs, so every check here costs a Dynamo trace and no Inductor
compile.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagcompile import DiagLinear, get_sparse_mark, mark_sparse
from diagcompile.ops import to_dense
from diagcompile.passes import SparseRewriteError, diag_inputs, rewrite_dynamo
from diagcompile.testing import masked_dense_copy, masked_training_copy

DIAG = torch.ops.diagcompile.diag_linear.default


def capture(model, *args, grad: bool = True):
    """Dynamo's graph module and example inputs for ``model(*args)`` (fullgraph)."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend, fullgraph=True)(*args)
    (out,) = seen
    return out


def run(gm, args):
    """Call a rewritten Dynamo graph module the way the backend does."""
    return gm(*args, *diag_inputs(gm)(args))[0]


def test_inference_converts_once(zoo):
    net = zoo.make_net()
    x = torch.randn(3, 12)
    gm, ex = capture(net, x, grad=False)
    code = gm.code
    with torch.no_grad():
        new, report = rewrite_dynamo(gm, ex)
    assert report.count == zoo.NET_SITES and {s.state for s in report.sites} == {"converted"}
    assert report.weights[0] == "self.blocks.0.fc1.weight" and report.weights[-1] == "self.head.w"
    assert sum(n.target is DIAG for n in new.graph.nodes) == zoo.NET_SITES
    assert sum(n.target is F.linear for n in new.graph.nodes) == 2
    assert gm.code == code and new is not gm  # Dynamo's own module is left as it was
    # Two extra inputs (values, offsets) per marked weight, after Dynamo's; the dense weights stay
    # inputs (Dynamo fixed the signature) but nothing reads them.
    placeholders = [n for n in new.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(ex) + 2 * zoo.NET_SITES
    dense = {id(p) for p in net.parameters() if get_sparse_mark(p) is not None}
    assert all(not node.users for node, t in zip(placeholders, ex) if id(t) in dense)
    with torch.no_grad():
        torch.testing.assert_close(run(new, ex), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)


def test_one_graph_serves_many_weights(zoo):
    """Dynamo compiles one graph for equally shaped modules; each call must use its own weight's diagonals,
    and a module marked differently (or not at all) in the same place is refused clearly."""
    a, b, c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    mark_sparse(a, sparsity=0.5)
    mark_sparse(b, sparsity=0.5)
    x = torch.randn(2, 8)
    gm, ex = capture(lambda mod, x: mod(x), a, x, grad=False)
    new, _ = rewrite_dynamo(gm, ex)
    for mod in (a, b):
        args = [mod.weight if t is a.weight else mod.bias if t is a.bias else t for t in ex]
        torch.testing.assert_close(run(new, args), masked_dense_copy(mod)(x))
    args = [c.weight if t is a.weight else t for t in ex]
    with pytest.raises(SparseRewriteError, match=r"built for the sparse-marked weight .* with an unmarked tensor"):
        run(new, args)
    mark_sparse(c, sparsity=0.75)
    with pytest.raises(SparseRewriteError, match=r"\(k=4\) and is now called with a weight marked with k=2"):
        run(new, args)


def test_training_gathers_from_the_dense_weight(zoo):
    """Grad mode: values come from the live weight; gradients match the masked dense model's."""
    net = zoo.make_net()
    ref = masked_training_copy(net)
    x = torch.randn(4, 12)
    gm, ex = capture(net, x)
    new, report = rewrite_dynamo(gm, ex)
    assert report.count == zoo.NET_SITES and {s.state for s in report.sites} == {"gathered"}
    run(new, ex).square().sum().backward()
    ref(x).square().sum().backward()
    for name, p in net.named_parameters():
        if name.endswith(("fc1.weight", "fc2.weight", "head.w")):
            owner, _, attr = name.rpartition(".")
            ref_grad = ref.get_submodule(owner).parametrizations[attr].original.grad
        else:
            ref_grad = ref.get_parameter(name).grad
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-5, atol=1e-6, msg=name)
    # Exactly zero off the kept diagonals.
    w = net.blocks[0].fc1.weight
    off = torch.tensor(get_sparse_mark(w).offsets, dtype=torch.int32)
    mask = to_dense(torch.ones(off.numel(), 12), off, 20, 12).bool()
    assert w.grad[~mask].abs().max() == 0 and w.grad[mask].abs().max() > 0


def test_top_k_marks_are_pinned(zoo):
    net = zoo.make_net()
    w = net.blocks[0].fc1.weight
    assert get_sparse_mark(w).offsets is None
    expected = get_sparse_mark(w).resolve_offsets(w).tolist()
    gm, ex = capture(net, torch.randn(2, 12))
    rewrite_dynamo(gm, ex)
    assert list(get_sparse_mark(w).offsets) == expected
    assert get_sparse_mark(net.blocks[0].fc2.weight).offsets == (0, 3, 7, 19)  # explicit marks unchanged
    with torch.no_grad():  # training moves the weight; the diagonals stay those pinned
        w.mul_(torch.rand_like(w))
    gm, ex = capture(net, torch.randn(5, 12))
    _, report = rewrite_dynamo(gm, ex)
    assert list(get_sparse_mark(w).offsets) == expected


def test_tied_weight_is_one_placeholder_two_sites(zoo):
    net = zoo.make_tied()
    x = torch.randn(3, 16)
    gm, ex = capture(net, x, grad=False)
    new, report = rewrite_dynamo(gm, ex, training=False)
    assert report.count == 2 and len(report.weights) == 1
    assert len(diag_inputs(new)) == 2  # one (values, offsets) pair for the shared weight
    torch.testing.assert_close(run(new, ex), masked_dense_copy(net)(x))


def test_nothing_marked_returns_the_same_module(zoo):
    gm, ex = capture(zoo.make_net(mark=False), torch.randn(2, 12))
    new, report = rewrite_dynamo(gm, ex)
    assert new is gm and report.count == 0


def test_autocast_site_dtype(zoo):
    """Under autocast the linear's output dtype (bf16) is the op's: x, values and bias follow it."""
    net = zoo.make_net()
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm, ex = capture(net, x, grad=False)
        new, report = rewrite_dynamo(gm, ex, training=False)
        ours = run(new, ex)
        eager = masked_dense_copy(net)(x)
    assert report.count == zoo.NET_SITES
    assert ours.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), eager.float(), rtol=0.05, atol=0.05)


def test_autocast_entered_inside_the_graph_allows_mixed_dtypes():
    """``with torch.autocast`` in the compiled code itself: the graph holds the region, so its mixed dtypes pass."""
    lin = nn.Linear(12, 8)
    mark_sparse(lin, sparsity=0.5)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(x)

    x = torch.randn(3, 12, dtype=torch.float16)  # against a float32 weight: eager autocast casts both
    gm, ex = capture(f, x, grad=False)
    new, report = rewrite_dynamo(gm, ex, training=False)
    ours, eager = run(new, ex), masked_dense_copy(lin)(x.float()).bfloat16()
    assert report.count == 1 and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), eager.float(), rtol=0.05, atol=0.05)


@torch.compiler.allow_in_graph
def _scale_like_autocast(x):  # a user's own graph function whose name merely contains "autocast"
    return x * 2


def test_a_function_named_like_autocast_does_not_waive_the_dtype_check():
    """The check once matched "autocast" anywhere in a node's target: any such user function let a mismatch
    that eager ``nn.Linear`` raises on run, silently cast."""
    lin = nn.Linear(12, 8)
    mark_sparse(lin, sparsity=0.5)
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(RuntimeError, match="same dtype"):  # eager raises; the graph is kept
        torch.compile(lambda x: lin(_scale_like_autocast(x)), backend=backend, fullgraph=True)(
            torch.randn(3, 12, dtype=torch.float64)
        )
    ((gm, ex),) = seen
    assert any(n.target is _scale_like_autocast for n in gm.graph.nodes)
    with pytest.raises(SparseRewriteError, match=r"dtype mismatch.*torch.float64 but the marked weight"):
        rewrite_dynamo(gm, ex, training=False)


def test_marked_weight_used_outside_linear_raises():
    w = nn.Parameter(torch.randn(8, 8))
    mark_sparse(w, sparsity=0.5)
    gm, ex = capture(lambda x: x @ w.t() + F.linear(x, w), torch.randn(2, 8))
    with pytest.raises(SparseRewriteError, match=r"weight 'w' is marked sparse but node .* uses it other than"):
        rewrite_dynamo(gm, ex)


def test_example_inputs_must_match_placeholders(zoo):
    gm, ex = capture(zoo.make_net(), torch.randn(2, 12))
    with pytest.raises(ValueError, match="example inputs for a graph with"):
        rewrite_dynamo(gm, ex[:-1])


def test_converted_values_follow_the_weight_version(zoo):
    """Converted once per weight (shared by every graph), refreshed in place when the weight changes."""
    net = zoo.make_net()
    x = torch.randn(2, 12)
    with torch.no_grad():
        a, _ = rewrite_dynamo(*capture(net, x, grad=False))
        b, _ = rewrite_dynamo(*capture(net, torch.randn(5, 12), grad=False))
    _, ex_a = capture(net, x, grad=False)
    va, vb = diag_inputs(a)(ex_a)[1], diag_inputs(b)(ex_a)[1]
    assert va is vb  # (offsets, values) of blocks.0.fc1: one tensor for both graphs
    before = va.clone()
    with torch.no_grad():
        net.blocks[0].fc1.weight.add_(1.0)  # bumps the version counter
        torch.testing.assert_close(run(a, ex_a), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)
    assert diag_inputs(a)(ex_a)[1] is va and not torch.equal(va, before)
    again = diag_inputs(a)(ex_a)
    assert diag_inputs(a)(ex_a) is again  # unchanged weights: the cached inputs come back as they are


def test_a_weight_with_diagonal_state_pickles(zoo):
    """torch.save(model) / pickling to another process after a compiled call: the state rides in the weight's
    __dict__, and its cache's weak references cannot be pickled (TypeError). The copy keeps mark and offsets
    and converts its values afresh."""
    import io

    net = zoo.make_net()
    x = torch.randn(2, 12)
    with torch.no_grad():
        gm, _ = rewrite_dynamo(*capture(net, x, grad=False))
    _, ex = capture(net, x, grad=False)
    with torch.no_grad():
        y = run(gm, ex)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    w, w2 = net.blocks[0].fc1.weight, copy.blocks[0].fc1.weight
    state, state2 = w.__dict__["_diagcompile_state"], w2.__dict__["_diagcompile_state"]
    assert state2.mark == state.mark and torch.equal(state2.offsets, state.offsets) and not state2._values
    _, ex2 = capture(copy, x, grad=False)
    with torch.no_grad():
        assert torch.equal(run(gm, ex2), y)


def test_a_graph_shared_by_two_weights_never_returns_the_others_cached_inputs(monkeypatch):
    """Two threads run one graph with two blocks' weights (a graph shared by repeated blocks). A call whose
    weights passed the cache check must get the inputs of that cache, even if another thread has stored its
    own call's since: it got the other block's diagonal values (a wrong answer, silently)."""
    from diagcompile.passes.rewrite_dynamo import DiagInputs

    lins = [nn.Linear(16, 16) for _ in range(2)]
    for lin in lins:
        mark_sparse(lin, sparsity=0.5)
    x = torch.randn(2, 16)
    with torch.no_grad():
        new, _ = rewrite_dynamo(*capture(lambda lin, x: lin(x), lins[0], x, grad=False))
    _, ex = capture(lambda lin, x: lin(x), lins[0], x, grad=False)
    pos = next(i for i, t in enumerate(ex) if t is lins[0].weight)
    args = [[lin.weight if i == pos else t for i, t in enumerate(ex)] for lin in lins]
    inputs = diag_inputs(new)
    want = [[t.clone() for t in inputs(a)] for a in args]
    assert not torch.equal(want[0][0], want[1][0])
    inputs(args[0])  # cached: block 0
    check, other = DiagInputs._unchanged, []

    def check_then_other_thread_stores(self, *a):
        unchanged = check(self, *a)
        if unchanged and not other:  # the other thread's call lands right after this one's check
            other.append(inputs(args[1]))
        return unchanged

    monkeypatch.setattr(DiagInputs, "_unchanged", check_then_other_thread_stores)
    got = inputs(args[0])
    assert other and all(torch.equal(g, w) for g, w in zip(got, want[0]))


def test_marking_anew_rebuilds_the_state_and_stale_graphs_refuse():
    lin = nn.Linear(8, 8)
    mark_sparse(lin, sparsity=0.5)
    x = torch.randn(2, 8)
    gm, ex = capture(lin, x, grad=False)
    new, _ = rewrite_dynamo(gm, ex)
    run(new, ex)
    mark_sparse(lin, sparsity=0.75)  # k 4 -> 2: the compiled graph no longer fits
    # Marks are read at compile time; the old graph notices once it rebuilds its inputs (here: the weight
    # changed in place) and refuses rather than run the new diagonals through a graph built for others.
    with torch.no_grad():
        lin.weight.mul_(2)
    with pytest.raises(SparseRewriteError, match=r"k=2.*torch._dynamo.reset\(\) after changing marks"):
        run(new, ex)
    gm, ex = capture(lin, x, grad=False)  # a fresh compile follows the new mark
    new, report = rewrite_dynamo(gm, ex)
    assert report.sites[0].k == 2
    torch.testing.assert_close(run(new, ex), masked_dense_copy(lin)(x))


class _Mixed(nn.Module):
    """An embedding, a linear, a diagonal layer and a parameter used through ``t()`` as a linear's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.fc = nn.Linear(16, 16)
        self.diag = DiagLinear(16, 16, sparsity=0.5)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, ids):
        h = self.diag(self.fc(self.emb(ids)))
        return torch.nn.functional.linear(h, self.w.t())


def test_weight_inputs_are_the_parameters_a_linear_weight_comes_from():
    # The backend checks these inputs' marks at every call: every 2-D parameter (embeddings, DiagLinear
    # values) put each compiled graph behind that check (review); only what feeds a linear's weight matters.
    from diagcompile.passes._core import weight_inputs

    gm, ex = capture(_Mixed(), torch.randint(0, 10, (3,)))
    names = sorted(name for _, name in weight_inputs(gm, ex))
    assert len(names) == 2 and names[0].endswith("fc.weight") and names[1].endswith("w"), names
