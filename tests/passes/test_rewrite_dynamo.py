"""rewrite_dynamo on real Dynamo graphs, run eagerly (the backend tests add Inductor on top).

A capturing backend hands us Dynamo's ``(gm, example_inputs)``; the rewritten graph module is then called
with the same inputs, so every check here costs a Dynamo trace and no Inductor compile.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagcompile import get_sparse_mark, mark_sparse
from diagcompile.ops import to_dense
from diagcompile.passes import SparseRewriteError, rewrite_dynamo
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


def _input_index(gm, ex, x):
    return next(i for i, t in enumerate(ex) if t is x)


def test_inference_converts_once(zoo):
    net = zoo.make_net()
    x = torch.randn(3, 12)
    gm, ex = capture(net, x, grad=False)
    code = gm.code
    with torch.no_grad():
        new, report = rewrite_dynamo(gm, ex)
    assert report.count == zoo.NET_SITES and {s.state for s in report.sites} == {"constant"}
    assert report.weights[0] == "self.blocks.0.fc1.weight" and report.weights[-1] == "self.head.w"
    assert sum(n.target is DIAG for n in new.graph.nodes) == zoo.NET_SITES
    assert sum(n.target is F.linear for n in new.graph.nodes) == 2
    assert gm.code == code and new is not gm  # Dynamo's module is left as it was
    # The dense weights are still inputs (Dynamo fixed the signature) but nothing reads them.
    dense = {id(p) for p in net.parameters() if get_sparse_mark(p) is not None}
    for node, t in zip([n for n in new.graph.nodes if n.op == "placeholder"], ex):
        if id(t) in dense:
            assert not node.users
    with torch.no_grad():
        torch.testing.assert_close(new(*ex)[0], masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)


def test_training_gathers_from_the_dense_weight(zoo):
    """Grad mode: values come from the live weight; gradients match the masked dense model's."""
    net = zoo.make_net()
    ref = masked_training_copy(net)
    x = torch.randn(4, 12)
    gm, ex = capture(net, x)
    new, report = rewrite_dynamo(gm, ex)
    assert report.count == zoo.NET_SITES and {s.state for s in report.sites} == {"extract"}
    new(*ex)[0].square().sum().backward()
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
    gm, ex = capture(net, torch.randn(2, 12))
    rewrite_dynamo(gm, ex, pin=False)
    assert get_sparse_mark(w).offsets is None
    expected = get_sparse_mark(w).resolve_offsets(w).tolist()
    rewrite_dynamo(gm, ex)
    assert list(get_sparse_mark(w).offsets) == expected
    assert get_sparse_mark(net.blocks[0].fc2.weight).offsets == (0, 3, 7, 19)  # explicit marks unchanged


def test_tied_weight_is_one_placeholder_two_sites(zoo):
    net = zoo.make_tied()
    x = torch.randn(3, 16)
    gm, ex = capture(net, x, grad=False)
    new, report = rewrite_dynamo(gm, ex, training=False)
    assert report.count == 2 and len(report.weights) == 1
    assert sum(n.op == "get_attr" and n.target.endswith("values") for n in new.graph.nodes) == 1
    torch.testing.assert_close(new(*ex)[0], masked_dense_copy(net)(x))


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
        ours = new(*ex)[0]
        eager = masked_dense_copy(net)(x)
    assert report.count == zoo.NET_SITES
    assert ours.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), eager.float(), rtol=0.05, atol=0.05)


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


def test_converted_values_are_shared_across_recompiles_until_the_weight_changes(zoo):
    net = zoo.make_net()
    first = capture(net, torch.randn(2, 12), grad=False)
    second = capture(net, torch.randn(5, 12), grad=False)
    with torch.no_grad():
        a, _ = rewrite_dynamo(*first)
        b, _ = rewrite_dynamo(*second)
    assert a.get_buffer("_diag0_values") is b.get_buffer("_diag0_values")
    with torch.no_grad():
        net.blocks[0].fc1.weight.add_(1.0)  # bumps the version counter
        c, _ = rewrite_dynamo(*second)
    assert c.get_buffer("_diag0_values") is not a.get_buffer("_diag0_values")
    assert not torch.equal(c.get_buffer("_diag0_values"), a.get_buffer("_diag0_values"))
