"""The diagcompile torch.compile backend with real Inductor: graph counts, numerics, training semantics.

Inductor compiles cost seconds each on CI's CPUs, so every test here compiles one model and checks as
much as it can on it. Graph counts rely on the fresh ``TORCHINDUCTOR_CACHE_DIR`` that tests/conftest.py
sets per session (automatic-dynamic PGO would otherwise remember decisions across runs).
"""

import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.decorators import mark_unbacked
from torch._dynamo.testing import CompileCounterWithBackend

import diagcompile
from diagcompile import DiagLinear, DiagSparsityConfig, get_sparse_mark, mark_sparse, sparsify_, unmark_sparse
from diagcompile.ops import extract_diagonals
from diagcompile.passes import SparseRewriteError, diagcompile_backend, inductor_config, pin_marks_
from diagcompile.testing import (
    dense_original,
    masked_dense_copy,
    masked_training_copy,
    requires_cuda,
    run_python,
)

BATCHES = (1, 2, 3, 7, 64)
MARKED = ("fc1.weight", "fc2.weight", "head.w")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_registered_by_entry_point_in_a_fresh_process():
    """``backend="diagcompile"`` resolves without importing diagcompile, and compiles through it."""
    out = run_python(
        """
import sys, torch
from torch._dynamo.backends.registry import lookup_backend
assert "diagcompile" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
assert "diagcompile" not in sys.modules
fn = lookup_backend("diagcompile")
print(fn.__module__, fn.__name__)
f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend="diagcompile", fullgraph=True)
x = torch.randn(4, 8)
torch.testing.assert_close(f(x), torch.nn.functional.gelu(x) * 2)
print("compiled", "diagcompile.passes.backend" in sys.modules)
"""
    )
    assert "diagcompile.passes.backend diagcompile_backend" in out
    assert "compiled True" in out


def test_diagcompile_compile_is_lazy():
    out = run_python(
        "import sys, diagcompile; print(callable(diagcompile.compile), 'diagcompile.passes' in sys.modules)"
    )
    assert out.split() == ["True", "False"]
    with pytest.raises(TypeError, match="sparsify=True needs an nn.Module"):
        diagcompile.compile(lambda x: x, sparsify=True)


def test_inference_fullgraph_batch_sizes_compile_at_most_twice(zoo):
    net = zoo.make_net()
    ref = masked_dense_copy(net)
    counter = CompileCounterWithBackend("diagcompile")  # the string backend, as users name it
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    with torch.no_grad():
        for b in BATCHES:
            x = torch.randn(b, 12)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 2, counter.frame_count
        # Converted once per weight version: an in-place change (load_state_dict, an optimizer step) is
        # picked up by the next call, without recompiling.
        net.load_state_dict({k: v * 3 for k, v in net.state_dict().items()})
        x = torch.randn(3, 12)
        torch.testing.assert_close(compiled(x), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 2


class _BreakingBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc(x))
        torch._dynamo.graph_break()
        return y * 2


def test_graph_shared_by_repeated_blocks():
    """A graph break inside a repeated block: Dynamo compiles the block once and runs that graph for every
    block, each with its own weights and diagonals."""
    model = nn.Sequential(*[_BreakingBlock() for _ in range(3)])
    for block in model:
        mark_sparse(block.fc, sparsity=0.75)
    reports = []
    compiled = diagcompile.compile(model, on_rewrite=reports.append)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    assert sum(r.count for r in reports) < len(model)  # fewer rewritten graphs than blocks: they are shared


def test_marked_linears_fed_by_marked_linears(zoo, graph_form):
    """Back to back, through reshapes, an output read twice (see the Chain model): inference and training
    graphs (converted / gathered values) both match the masked dense model."""
    net = zoo.make_chain()
    ref = masked_dense_copy(net)
    reports = []
    compiled = diagcompile.compile(net, fullgraph=True, on_rewrite=reports.append)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    assert [r.count for r in reports] == [zoo.CHAIN_SITES] * 2
    assert all(bool(r.inlined) == (graph_form == "inline") for r in reports)
    assert {s.state for s in reports[0].sites} == {"converted"} and {s.state for s in reports[1].sites} == {"gathered"}


def test_training_dynamic_batch_one_graph_matches_masked_dense(zoo, graph_form):
    """mark_unbacked batch: one graph for every size; forward, gradients and SGD steps match the eager
    dense model whose weights are masked (W * mask) to the same diagonals."""
    net = zoo.make_net()
    ref = masked_training_copy(net)
    reports = []
    compiled = diagcompile.compile(net, fullgraph=True, on_rewrite=reports.append)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

    def ref_param(name):
        return dense_original(ref, name) if name.endswith(MARKED) else ref.get_parameter(name)

    for b in BATCHES:
        x = torch.randn(b, 12)
        mark_unbacked(x, 0)
        loss = compiled(x).square().mean()
        loss_ref = ref(x).square().mean()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad, ref_param(name).grad, rtol=1e-4, atol=1e-6, msg=name)
        opt.step()
        opt_ref.step()
    assert len(reports) == 1, [str(r) for r in reports]
    assert reports[0].count == zoo.NET_SITES and {s.state for s in reports[0].sites} == {"gathered"}
    assert len(reports[0].inlined) == (zoo.NET_SITES if graph_form == "inline" else 0)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p, ref_param(name), rtol=1e-4, atol=1e-6, msg=name)

    # Getting the trained values back: the backend pinned its top-k choice on each weight; pin_marks_
    # carries it to the modules, and sparsify_ then keeps exactly the trained diagonals.
    w = net.blocks[1].fc1.weight.detach().clone()
    offsets = get_sparse_mark(net.blocks[1].fc1.weight).offsets
    assert offsets is not None
    pin_marks_(net)
    sparsify_(net, DiagSparsityConfig(only_marked=True))
    layer = net.blocks[1].fc1
    assert isinstance(layer, DiagLinear) and tuple(layer.offsets.tolist()) == offsets
    assert torch.equal(layer.values, extract_diagonals(w, layer.offsets))


def test_compile_sparsify_trains_compact_values(zoo, graph_form):
    """diagcompile.compile(sparsify=True): the optimizer holds (k, D) values; same steps as eager DiagLinear.
    Also passes mode= through (reduce-overhead = CUDA graphs, a no-op for CPU tensors)."""
    net = zoo.make_net()
    unmark_sparse(net.head.w)
    ref = sparsify_(copy.deepcopy(net), DiagSparsityConfig(only_marked=True))
    reports = []
    compiled = diagcompile.compile(
        net, sparsify=True, fullgraph=True, mode="reduce-overhead", on_rewrite=reports.append
    )
    assert isinstance(net.blocks[0].fc1, DiagLinear)
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.endswith(("fc1.weight", "fc2.weight")) for n in names) and "blocks.0.fc1.values" in names
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x = torch.randn(5, 12)
        for model, o in ((compiled, opt), (ref, opt_ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert reports and all(r.count == 0 for r in reports)  # nothing marked is left: DiagLinear ops pass through
    assert all(bool(r.inlined) == (graph_form == "inline") for r in reports)
    ref_params = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6, msg=name)


def test_errors_surface_through_torch_compile():
    w = nn.Parameter(torch.randn(8, 8))
    mark_sparse(w, sparsity=0.5)
    f = torch.compile(lambda x: x @ w.t(), backend="diagcompile", fullgraph=True)
    with pytest.raises(Exception, match="marked sparse but node .* uses it other than as the weight of a linear"):
        f(torch.randn(2, 8))
    torch._dynamo.reset()
    g = torch.compile(nn.Linear(4, 4), backend="diagcompile", options={"no_such_option": 1})
    with pytest.raises(Exception, match="unknown Inductor option 'no_such_option'"):
        g(torch.randn(2, 4))
    with pytest.raises(TypeError, match="always uses the diagcompile backend"):
        diagcompile.compile(nn.Linear(4, 4), backend="inductor")


class _BareWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w)


class _BodyBreakHead(nn.Module):
    """A diagonal body, a graph break, a dense head: the head's graph has linears and nothing sparse."""

    def __init__(self):
        super().__init__()
        self.body, self.head = DiagLinear(16, 16, sparsity=0.5), nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        torch._dynamo.graph_break()
        return self.head(h)


def _backend_warnings(recwarn):
    return [w for w in recwarn if "diagcompile backend" in str(w.message)]


def test_a_graph_with_nothing_sparse_warns_instead_of_running_dense_silently(recwarn, monkeypatch):
    # copy.deepcopy rebuilds a Parameter from its data and drops the mark on the weight, all the backend sees:
    # the compiled copy would be dense with no sign. diagcompile.compile / sync_marks restore a module's mark.
    from diagcompile.passes import backend

    def fresh():
        torch._dynamo.reset()
        monkeypatch.setattr(backend, "_dense_state", {"warned": False, "seen_sparse": False})

    m = _BareWeight()
    mark_sparse(m.w, sparsity=0.75)
    x = torch.randn(4, 16)
    warnings.simplefilter("always")
    for model in (copy.deepcopy(m), copy.deepcopy(mark_sparse(nn.Linear(16, 32), sparsity=0.75))):
        fresh()
        with pytest.warns(UserWarning, match=r"graph with 1 linear\(s\) and none sparse-marked .*copy.deepcopy"):
            torch.compile(model, backend="diagcompile")(x)
        torch._dynamo.reset()
        recwarn.clear()
        torch.compile(nn.Linear(16, 2), backend="diagcompile")(x)
        assert not _backend_warnings(recwarn)  # once per process
    fresh()
    torch.testing.assert_close(torch.compile(m, backend="diagcompile")(x), masked_dense_copy(m)(x))
    marked = mark_sparse(nn.Linear(16, 32), sparsity=0.75)
    fresh()
    torch.testing.assert_close(diagcompile.compile(copy.deepcopy(marked))(x), masked_dense_copy(marked)(x))
    copied = copy.deepcopy(marked)
    diagcompile.marking.sync_marks(copied)
    fresh()
    torch.testing.assert_close(torch.compile(copied, backend="diagcompile")(x), masked_dense_copy(marked)(x))
    # A dense head split off by a graph break: diagcompile.compile knows the model is sparse; the raw backend
    # has seen a sparse graph first.
    for compile_ in (diagcompile.compile, functools.partial(torch.compile, backend="diagcompile")):
        fresh()
        compile_(_BodyBreakHead())(x)
    assert not _backend_warnings(recwarn)


def test_inductor_config_matches_torch_modes():
    from torch._inductor import list_mode_options

    assert inductor_config() == {}
    assert inductor_config("default") == {}
    assert inductor_config("reduce-overhead") == list_mode_options("reduce-overhead") == {"triton.cudagraphs": True}
    assert inductor_config("max-autotune", {"epilogue-fusion": False})["epilogue_fusion"] is False
    with pytest.raises(ValueError, match="Unrecognized mode"):
        inductor_config("fastest")
    with pytest.raises(TypeError, match="dict"):
        inductor_config(options=[("a", 1)])


# ----------------------------------------------------------------------------------------------------
# GPU (run on the H100 machine; skipped here with a reason)
# ----------------------------------------------------------------------------------------------------
def _cuda_net(zoo, dtype):
    net = zoo.make_net().to("cuda", dtype)
    # .to() keeps Parameter objects (and marks) when converting dtype in place.
    assert get_sparse_mark(net.blocks[0].fc1.weight) is not None
    return net


@requires_cuda()
def test_cuda_inference_bf16_dynamic_batch(zoo):
    net = _cuda_net(zoo, torch.bfloat16)
    ref = masked_dense_copy(net)
    reports = []
    compiled = torch.compile(
        net, backend=functools.partial(diagcompile_backend, on_rewrite=reports.append), fullgraph=True
    )
    with torch.no_grad():
        for b in BATCHES:
            x = torch.randn(b, 12, device="cuda", dtype=torch.bfloat16)
            mark_unbacked(x, 0)
            torch.testing.assert_close(compiled(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)
    assert len(reports) == 1 and reports[0].count == zoo.NET_SITES


@requires_cuda()
def test_cuda_reduce_overhead_uses_cuda_graphs(zoo):
    from torch._dynamo.utils import counters

    net = _cuda_net(zoo, torch.float32)
    ref = masked_dense_copy(net)
    counters.clear()
    compiled = torch.compile(net, backend="diagcompile", mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 12, device="cuda")
    with torch.no_grad():
        for _ in range(4):  # warm-up, record, replay
            out = compiled(x).clone()
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@requires_cuda()
def test_cuda_training_matches_masked_dense(zoo):
    net = _cuda_net(zoo, torch.float32)
    ref = masked_training_copy(net)
    compiled = diagcompile.compile(net, fullgraph=True)
    x = torch.randn(16, 12, device="cuda")
    compiled(x).square().mean().backward()
    ref(x).square().mean().backward()
    for name, p in net.named_parameters():
        r = dense_original(ref, name) if name.endswith(MARKED) else ref.get_parameter(name)
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------
# Found by a user trial (2026-11-24): each of these ran dense, stale or crashed before
# ----------------------------------------------------------------------------------------------------
def test_a_graph_built_for_a_dense_block_runs_marked_ones_as_a_variant():
    """A dense first block and marked later ones, with a graph break in the block: Dynamo builds the block's
    graph for the dense block and reuses it for the others (guards check shapes, not marks). The marked
    blocks must not run dense: they run a variant compiled for their marks, once for both."""
    model = nn.Sequential(*[_BreakingBlock() for _ in range(3)])
    for block in model[1:]:
        mark_sparse(block.fc, sparsity=0.75)
    reports = []
    compiled = diagcompile.compile(model, on_rewrite=reports.append)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    # The block's two graphs (around the break; the second has no linear), then one variant for both marked
    # blocks: the marked blocks' graphs are not compiled one per block.
    assert [r.count for r in reports] == [0, 0, 1]


class _Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def _regional(sparsities: list[float | None]) -> tuple[nn.Sequential, list]:
    """Blocks marked with ``sparsities`` (None: dense), each compiled on its own (regional compilation)
    with one backend callable, so Dynamo shares one graph between them; the reports of each rewrite."""
    model = nn.Sequential(*[_Block() for _ in sparsities])
    for block, sparsity in zip(model, sparsities):
        if sparsity is not None:
            mark_sparse(block.fc1.weight, sparsity=sparsity)
            mark_sparse(block.fc2.weight, sparsity=sparsity)
    reports = []
    backend = functools.partial(diagcompile_backend, on_rewrite=reports.append, warn_if_dense=False)
    for block in model:
        block.compile(backend=backend, dynamic=True)
    return model, reports


def test_regional_compilation_of_blocks_marked_differently():
    """One graph for all blocks (dynamic batch): a variant per pattern of marks (dense, 0.75, 0.5), each
    compiled once, dynamic like the graph it came from, each block running its own diagonals."""
    model, reports = _regional([None, 0.75, 0.5, 0.75, None])
    with torch.no_grad():
        for batch in (5, 2, 9):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(model(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    assert [r.count for r in reports] == [0, 2, 2]


def test_regional_compilation_trains_the_marked_blocks_diagonally():
    """Training through a variant: the gradient reaches the marked blocks' kept diagonals only, as in the
    masked dense model (blocks 1+ take an input that requires grad: one graph for them, two patterns)."""
    model, reports = _regional([None, 0.75, None, 0.75])
    ref = masked_training_copy(model)
    x = torch.randn(6, 16)
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    for name, p in model.named_parameters():
        marked = get_sparse_mark(p) is not None
        r = dense_original(ref, name) if marked else ref.get_parameter(name)
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)
        if marked:
            assert (p.grad == 0).float().mean() >= 0.5, name
    assert sorted(r.count for r in reports) == [0, 0, 2]


class _CloningBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.linear(x, self.fc.weight.clone(), self.fc.bias)


def test_variants_follow_the_compile_stance():
    """A variant is a recompile Dynamo does not see: set_stance("fail_on_recompile") must refuse it, and
    "eager_on_recompile" must run the block eagerly (its marked linears dense, as eager does)."""
    model, reports = _regional([None, 0.75])
    x = torch.randn(3, 16)
    with torch.no_grad():
        model[0](x)
        with torch.compiler.set_stance("fail_on_recompile"):
            with pytest.raises(RuntimeError, match=r"^Detected recompile .*'fail_on_recompile': this compiled graph"):
                model[1](x)
        with torch.compiler.set_stance("eager_on_recompile"):
            torch.testing.assert_close(model[1](x), model[1].forward(x))  # Module.compile leaves forward eager
        assert [r.count for r in reports] == [0]  # neither stance compiled a variant
        torch.testing.assert_close(model[1](x), masked_dense_copy(model)[1](x), rtol=1e-5, atol=1e-5)
        assert [r.count for r in reports] == [0, 2]


def test_a_marked_weight_used_other_than_by_a_linear_in_a_shared_graph_is_refused():
    """A graph built for a dense block whose weight reaches the linear through ``clone()``: a marked block
    sharing it must not run dense, silently; the rewrite of its variant names the use it cannot rewrite."""
    model = nn.Sequential(_CloningBlock(), _CloningBlock())
    mark_sparse(model[1].fc, sparsity=0.5)
    backend = functools.partial(diagcompile_backend, warn_if_dense=False)
    for block in model:
        block.compile(backend=backend)
    with torch.no_grad(), pytest.raises(SparseRewriteError, match=r"node 'clone' .* other than as the weight"):
        model(torch.randn(3, 16))


def test_a_variant_that_needs_a_new_shape_guard_poisons_later_variants(monkeypatch):
    """A variant compile that assumes a shape fact (here ``batch > 3``, as an Inductor lowering might) is refused,
    since Dynamo never installs that guard. The fact stays in the shared shape environment, so the same pattern
    is not compiled again (it ran the second time, review) and no new pattern is compiled under it."""
    from torch._subclasses.fake_tensor import FakeTensor

    from diagcompile.passes import backend as backend_module

    variant_compiles = []
    original = backend_module._compile_graph

    def assuming(gm, example_inputs, *args, fake_mode=None, **kwargs):
        if fake_mode is not None:  # a variant
            variant_compiles.append(1)
            batch = next(e for e in example_inputs if isinstance(e, FakeTensor) and e.dim() == 2).shape[0]  # x
            assert isinstance(batch, torch.SymInt) and bool(batch > 3)  # adds the guard
        return original(gm, example_inputs, *args, fake_mode=fake_mode, **kwargs)

    monkeypatch.setattr(backend_module, "_compile_graph", assuming)
    model, _ = _regional([None, 0.75, 0.5])
    x = torch.randn(5, 16)
    with torch.no_grad():
        model[0](x)
        for block in (model[1], model[1], model[2]):
            with pytest.raises(SparseRewriteError, match="needed a shape guard the first compile did not install"):
                block(x)
    assert len(variant_compiles) == 1


def test_variants_refused_past_the_limit(monkeypatch):
    """Past the limit of mark patterns per graph, a call is refused by name, not run dense."""
    monkeypatch.setattr(diagcompile.passes.backend, "_MAX_VARIANTS", 1)
    model, _ = _regional([None, 0.75])
    with torch.no_grad(), pytest.raises(SparseRewriteError, match=r"built for the unmarked .*dense.* weight .*fc1"):
        model(torch.randn(3, 16))


def test_a_graph_not_from_dynamo_refuses_other_marks():
    """Called outside torch.compile (no fake mode to compile a variant in): a marked weight in the place of
    the dense one it was built for is refused, not run dense."""
    gm = torch.fx.symbolic_trace(lambda x, w: torch.nn.functional.linear(x, w))
    x, w = torch.randn(3, 16), nn.Parameter(torch.randn(8, 16))
    run = diagcompile_backend(gm, [x, w], warn_if_dense=False)
    with torch.no_grad():
        torch.testing.assert_close(run(x, w), x @ w.T)
    mark_sparse(w, sparsity=0.5)
    with torch.no_grad(), pytest.raises(SparseRewriteError, match=r"no variant of the graph can be compiled"):
        run(x, w)


def _marked_mlp(hidden: int, sparsity: float) -> tuple[nn.Sequential, nn.Module]:
    """16 -> ``hidden`` -> 8, the first linear marked: the model and ``diagcompile.compile(model)``."""
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8))
    mark_sparse(model[0], sparsity=sparsity)
    return model, diagcompile.compile(model)


def test_weights_replaced_through_data_are_picked_up():
    """vector_to_parameters and Module.half()/float() assign .data: the storage changes, the version does not."""
    model, compiled = _marked_mlp(24, 0.5)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        flat = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(torch.randn_like(flat), model.parameters())
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
        model.half().float()  # rounds the weights: the compiled model must see the rounded ones
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loaded_after_compiling_decides_the_diagonals():
    """The first compile pinned the top-k of the random init on the weight; loading a checkpoint must undo
    that pin, so the compiled model (and an export) keep the loaded weight's top-k, like a fresh process.
    The pinned state is rebound in place: CUDA graphs recorded its tensors as static inputs."""
    model, compiled = _marked_mlp(16, 0.75)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
    state = model[0].weight.__dict__["_diagcompile_state"]
    offsets = state.offsets
    saved = copy.deepcopy(model.state_dict())
    t = torch.arange(16)
    saved["0.weight"].fill_(0.01)
    wanted = [3, 9, 10, 14]
    assert wanted != sorted(get_sparse_mark(model[0].weight).offsets)  # the init picked others
    for p in wanted:
        saved["0.weight"][t, (t + p) % 16] = 1.0
    model.load_state_dict(saved)
    with torch.no_grad():
        ref = masked_dense_copy(model)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    assert sorted(get_sparse_mark(model[0].weight).offsets) == wanted
    assert model[0].weight.__dict__["_diagcompile_state"] is state and state.offsets is offsets
    assert offsets.tolist() == wanted


def test_reloading_weights_trained_through_the_backend_keeps_their_diagonals():
    """Restoring a model's own earlier state (the best checkpoint, a rollback) after compiled training: the
    off-diagonal entries never trained, so re-resolving the top-k would switch to untrained diagonals."""
    torch.manual_seed(0)
    model, compiled = _marked_mlp(16, 0.75)
    opt = torch.optim.SGD(model[0].parameters(), lr=1.0)
    x = torch.randn(32, 16)
    for _ in range(30):  # drives the trained diagonals toward 0, below the untrained ones
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    pinned = get_sparse_mark(model[0].weight).offsets
    assert sorted(get_sparse_mark(model[0]).resolve_offsets(model[0].weight).tolist()) != sorted(pinned)
    with torch.no_grad():
        before = compiled(x)
        model.load_state_dict(copy.deepcopy(model.state_dict()))
        torch.testing.assert_close(compiled(x), before)
    assert get_sparse_mark(model[0].weight).offsets == pinned
    # A pretrained checkpoint of another lineage, loaded after those steps, decides the diagonals.
    pretrained = copy.deepcopy(model.state_dict())
    pretrained["0.weight"] = 0.01 * torch.randn(16, 16)
    t = torch.arange(16)
    for p in (3, 9, 10, 14):
        pretrained["0.weight"][t, (t + p) % 16] = 1.0
    model.load_state_dict(pretrained)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    assert sorted(get_sparse_mark(model[0].weight).offsets) == [3, 9, 10, 14]


def test_weights_created_under_inference_mode():
    """Serving code builds models under inference_mode: such tensors have no version counter to read."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
        x = torch.randn(3, 16)
    mark_sparse(model[0], sparsity=0.5)
    compiled = diagcompile.compile(model)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
        model[0].weight.mul_(2)  # in place, under inference mode: nothing records it, so it is re-read
        torch.testing.assert_close(compiled(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.fc, x, use_reentrant=False)


def test_refusals_name_the_cause():
    """Activation checkpointing, torch's fused attention fast path, mixed dtypes and a parametrized weight:
    each is refused by name, with the way out, not as a generic misuse (or a silent dense run)."""
    ckpt = _Checkpointed()
    mark_sparse(ckpt.fc, sparsity=0.5)
    with pytest.raises(Exception, match=r"inside a torch.utils.checkpoint region.*sparsify=True"):
        diagcompile.compile(ckpt)(torch.randn(2, 16))
    torch._dynamo.reset()
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    mark_sparse(layer.linear1, sparsity=0.5)
    with torch.no_grad(), pytest.raises(Exception, match=r"fused fast path.*set_fastpath_enabled\(False\)"):
        diagcompile.compile(layer)(torch.randn(2, 3, 16))
    torch._dynamo.reset()
    mixed = nn.Linear(16, 8)
    mark_sparse(mixed, sparsity=0.5)
    with pytest.raises(Exception, match=r"dtype mismatch.*torch.float64 but the marked weight .* torch.float32"):
        diagcompile.compile(mixed)(torch.randn(2, 16, dtype=torch.float64))
    torch._dynamo.reset()
    normed = nn.Linear(16, 8)
    mark_sparse(normed, sparsity=0.5)
    torch.nn.utils.parametrizations.weight_norm(normed)  # after marking: the mark is on the module only
    with pytest.raises(SparseRewriteError, match=r"weight is parametrized .*remove_parametrizations"):
        diagcompile.compile(normed)


def test_mixed_dtypes_under_autocast_still_compile():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    mark_sparse(model[2], sparsity=0.5)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = diagcompile.compile(model)(x), masked_dense_copy(model)(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_inference_cache_keeps_no_replaced_storage_alive():
    """The storage check holds storages weakly: after model.half(), the fp32 weights can be freed."""
    import weakref

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    mark_sparse(model[0], sparsity=0.5)
    compiled = diagcompile.compile(model)
    with torch.no_grad():
        compiled(torch.randn(2, 64))
    old = weakref.ref(model[0].weight.untyped_storage())
    model.half()
    assert old() is None, "the cache kept the replaced fp32 weight alive"
    with torch.no_grad():
        assert compiled(torch.randn(2, 64).half()).dtype == torch.float16


def test_compile_sparsify_converts_a_marked_linear_with_a_parametrized_weight():
    layer = nn.Linear(16, 8)
    mark_sparse(layer, sparsity=0.5)
    torch.nn.utils.parametrizations.weight_norm(layer)
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match="parametriz"):
        compiled = diagcompile.compile(model, sparsify=True)
    assert isinstance(model[0], DiagLinear) and compiled(torch.randn(2, 16)).shape == (2, 8)
