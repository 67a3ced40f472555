"""passes.inline through the diagcompile backend: which layers leave the op, and that the numbers stay."""

import contextlib
import copy
import weakref

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import diagcompile
from diagcompile import DiagLinear
from diagcompile.export import export_program
from diagcompile.ops import dispatch, force_path
from diagcompile.passes.inline import OffsetsCheck


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def op_calls(monkeypatch):
    """``(N_out, N_in)`` of every forward op call that actually runs (each one asks dispatch for its path)."""
    calls = []
    path_for = dispatch.path_for

    def counting(op, device_type, dtype, M, n_out, n_in, k):
        if op == "fwd":
            calls.append((n_out, n_in))
        return path_for(op, device_type, dtype, M, n_out, n_in, k)

    monkeypatch.setattr(dispatch, "path_for", counting)
    return calls


def _model() -> nn.Sequential:
    """At M = 5: two layers inside the edges (the second's weight at INLINE_MAX_WEIGHT) and a 512 x 512 one
    past it (stays an op call)."""
    torch.manual_seed(0)
    return nn.Sequential(
        DiagLinear(32, 64, sparsity=0.75),
        nn.GELU(),
        DiagLinear(64, 512, sparsity=0.9),
        DiagLinear(512, 512, bias=False),
    )


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    x = x.detach().requires_grad_()
    model(x).square().mean().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


def test_small_layers_run_without_op_calls_forward_and_backward(op_calls):
    model = _model()
    eager = copy.deepcopy(model)
    reports = []
    compiled = diagcompile.compile(model, fullgraph=True, dynamic=False, on_rewrite=reports.append)
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = compiled(x)
    assert len(reports[-1].inlined) == 2 and "inlined as dense GEMMs" in str(reports[-1])
    assert op_calls == [(512, 512)]
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-6)
    op_calls.clear()
    got = _grads(compiled, x)
    assert set(op_calls) == {(512, 512)}  # the training graph inlines the same layers
    for g, want in zip(got, _grads(eager, x), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def test_offsets_changed_in_place_are_followed_without_recompiling():
    """The offsets stay graph inputs: a topology update (DiagHeur's, set_offsets) needs no new graph."""
    layer = DiagLinear(48, 48, sparsity=0.75)
    counter = CompileCounterWithBackend("diagcompile")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(6, 48)
    with torch.no_grad():
        compiled(x)
        layer.set_offsets([1, 2, 3, 4, 5, 6, 9, 20, 30, 31, 40, 47][: layer.k], torch.randn(layer.k, 48))
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_a_dynamic_batch_inlines_only_the_smallest_layers(op_calls):
    model = nn.Sequential(DiagLinear(64, 256, sparsity=0.9), DiagLinear(256, 128, sparsity=0.9))
    reports = []
    compiled = diagcompile.compile(model, fullgraph=True, dynamic=True, on_rewrite=reports.append)
    xs = [torch.randn(b, 64) for b in (2, 9, 300)]  # not 1: Dynamo gives size 1 a graph of its own
    with torch.no_grad():
        ys = [compiled(x) for x in xs]
        assert len(reports) == 1 and len(reports[0].inlined) == 1
        assert op_calls == [(128, 256)] * 3  # 64 x 256 is within INLINE_MAX_WEIGHT_DYNAMIC, 256 x 128 is not
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why", ["inline_small=False", "force_path", "autocast"])
def test_nothing_is_inlined_when_asked_not_to_or_under_autocast(op_calls, why):
    layer = DiagLinear(32, 32, sparsity=0.5)

    def raw(x: torch.Tensor) -> torch.Tensor:
        # The raw op runs in x's dtype under autocast (the module's functional form casts first, and the
        # dtype rule alone keeps that bfloat16 call an op call); F.linear in its place would not.
        return torch.ops.diagcompile.diag_linear(x, layer.values, layer.offsets, layer.bias, 32)

    reports = []
    kwargs = {"inline_small": False} if why == "inline_small=False" else {}
    compiled = diagcompile.compile(raw, on_rewrite=reports.append, **kwargs)
    x = torch.randn(4, 32)
    if why == "force_path":
        context = force_path("dense")
    elif why == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        context = contextlib.nullcontext()
    with torch.no_grad(), context:
        y = compiled(x)
        assert reports[-1].inlined == () and op_calls == [(32, 32)]
        torch.testing.assert_close(y, raw(x))


def test_export_keeps_one_op_node_per_layer():
    model = _model().eval()
    ep = export_program(model, (torch.randn(2, 32),))
    ops = [n for n in ep.graph.nodes if n.op == "call_function" and "diagcompile" in str(n.target)]
    assert len(ops) == 3


def test_op_calls_by_keyword_and_with_out_features_as_a_graph_input():
    """Inlined or not, by keyword or with an ``out_features`` that Dynamo made an input (it changed between
    calls of one function), the compiled op computes what the eager one does."""
    wide, narrow = DiagLinear(16, 24, sparsity=0.5), DiagLinear(16, 8, sparsity=0.5)

    def by_keyword(x, v, o, b, n_out):
        return torch.ops.diagcompile.diag_linear(x=x, values=v, offsets=o, bias=b, out_features=n_out)

    def positional(x, v, o, b, n_out):
        return torch.ops.diagcompile.diag_linear(x, v, o, b, n_out)

    for fn in (by_keyword, positional):
        torch._dynamo.reset()
        reports = []
        compiled = diagcompile.compile(fn, on_rewrite=reports.append)
        with torch.no_grad():
            for layer in (wide, narrow, wide):
                args = (torch.randn(5, 16), layer.values, layer.offsets, layer.bias, layer.out_features)
                torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-6)
        assert reports[0].inlined  # the first graph, out_features a constant, inlines


@pytest.mark.parametrize(
    ("bad", "error"),
    [([0, 0, 1, 2], "offsets must be distinct"), ([0, 1, 2, 19], r"offsets must lie in \[0, P=16\)")],
    ids=["duplicate", "out of range"],
)
def test_inlined_layers_still_refuse_invalid_offsets(bad, error):
    """The op checks its offsets on the CPU; an inlined layer's are checked as the graph is called (once per
    tensor version) instead of to_dense wrapping or overwriting them."""
    layer = DiagLinear(16, 16, sparsity=0.75)
    reports = []
    compiled = diagcompile.compile(layer, on_rewrite=reports.append)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        assert reports[-1].inlined
        layer.offsets.copy_(torch.tensor(bad, dtype=layer.offsets.dtype))
        with pytest.raises(ValueError, match=error):
            compiled(x)
        layer.offsets.copy_(torch.tensor([0, 1, 2, 3], dtype=layer.offsets.dtype))  # valid again: runs
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


def test_the_offsets_check_keeps_no_input_alive():
    """Dynamo keeps a compiled graph, and its offsets check, after the model is gone: the check must not keep the
    model's offsets buffers alive, and a new tensor at the place of a dead one is checked again."""
    check = OffsetsCheck(((0, 16),))
    offsets = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    check([offsets])
    check([offsets])
    ref = weakref.ref(offsets)
    del offsets
    assert ref() is None
    with pytest.raises(ValueError, match="offsets must be distinct"):
        check([torch.tensor([0, 0, 1, 2], dtype=torch.int32)])


def test_offsets_computed_in_the_graph_are_asserted_there():
    """Offsets that are no graph input (made inside the compiled function) cannot be checked before the call:
    the inlined form asserts them in the graph."""
    layer = DiagLinear(16, 16, sparsity=0.75)

    def fn(x, shift):
        offsets = (torch.arange(4, dtype=torch.int32) * shift) % 17  # shift 5: 0 5 10 15; shift 0: all 0
        return torch.ops.diagcompile.diag_linear(x, layer.values, offsets, layer.bias, 16)

    reports = []
    compiled = diagcompile.compile(fn, on_rewrite=reports.append, dynamic=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        five, zero = torch.tensor(5, dtype=torch.int32), torch.tensor(0, dtype=torch.int32)
        torch.testing.assert_close(compiled(x, five), fn(x, five), rtol=1e-5, atol=1e-6)
        assert reports[-1].inlined
        with pytest.raises(RuntimeError, match=r"offsets must be distinct and lie in \[0, P=16\)"):
            compiled(x, zero)
