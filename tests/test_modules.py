"""DiagLinear: construction, init scale, from_dense/to_dense, state dict, repr."""

import copy
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear
from diagcompile.ops import OFFSET_DTYPE, k_from_sparsity
from diagcompile.testing import dense_from_convention, rel_err


@pytest.mark.parametrize("n_in,n_out", [(64, 32), (32, 64), (48, 48), (13, 7), (7, 13)])
def test_construction_shapes_and_properties(n_in, n_out):
    layer = DiagLinear(n_in, n_out, sparsity=0.75)
    P, D = max(n_in, n_out), min(n_in, n_out)
    k = k_from_sparsity(n_out, n_in, 0.75)
    assert layer.values.shape == (k, D) and layer.k == k
    assert layer.offsets.dtype == OFFSET_DTYPE and layer.offsets.shape == (k,)
    assert torch.all(layer.offsets[1:] > layer.offsets[:-1]) and 0 <= int(layer.offsets.min()) < P
    assert layer.density == pytest.approx(k / P)
    assert "k=" in repr(layer) and f"in_features={n_in}" in repr(layer)
    assert {n for n, _ in layer.named_parameters()} == {"values", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"offsets"}
    y = layer(torch.randn(2, 3, n_in))
    assert y.shape == (2, 3, n_out)


def test_random_offsets_follow_torch_rng_and_even_option():
    torch.manual_seed(1)
    a = DiagLinear(32, 64).offsets
    torch.manual_seed(1)
    b = DiagLinear(32, 64).offsets
    assert torch.equal(a, b)
    even = DiagLinear(768, 3072, sparsity=0.999, offset_init="even")
    assert even.offsets.tolist() == [0, 768, 1536, 2304]
    with pytest.raises(ValueError, match="offset_init"):
        DiagLinear(8, 8, sparsity=0.5, offset_init="spiral")


@pytest.mark.parametrize("n_in,n_out", [(256, 256), (256, 1024), (1024, 256)])
def test_init_keeps_the_dense_layers_activation_scale(n_in, n_out):
    torch.manual_seed(0)
    x = torch.randn(4096, n_in)
    dense = nn.Linear(n_in, n_out, bias=False)
    sparse = DiagLinear(n_in, n_out, bias=False, sparsity=0.9)
    ratio = sparse(x).std() / dense(x).std()
    # Same per-row variance as nn.Linear when every row has the real fan-in; tall layers have a few
    # rows with fewer entries, hence the band.
    assert 0.8 < ratio < 1.2, ratio


def test_from_dense_keeps_exactly_the_chosen_entries_bit_exact():
    lin = nn.Linear(24, 16)
    layer = DiagLinear.from_dense(lin, sparsity=0.5)
    W = layer.to_dense().detach()
    mask = dense_from_convention(torch.ones(layer.k, 16), layer.offsets, 16, 24).bool()
    assert torch.equal(W[mask], lin.weight.detach()[mask])  # bit-exact
    assert torch.count_nonzero(W[~mask]) == 0
    assert torch.equal(layer.bias, lin.bias)
    # top-k by L2 norm
    norms = torch.stack(
        [lin.weight.detach()[dense_from_convention(torch.ones(1, 16), [p], 16, 24).bool()].norm() for p in range(24)]
    )
    assert layer.offsets.tolist() == sorted(torch.topk(norms, layer.k).indices.tolist())


def test_from_dense_with_given_offsets_and_errors():
    lin = nn.Linear(6, 9, bias=False)
    layer = DiagLinear.from_dense(lin, offsets=[0, 4, 8])
    assert layer.offsets.tolist() == [0, 4, 8] and layer.bias is None
    x = torch.randn(3, 6)
    masked = lin.weight.detach() * (layer.to_dense() != 0)
    assert rel_err(layer(x), x @ masked.T) < 1e-6
    with pytest.raises(TypeError, match="nn.Linear"):
        DiagLinear.from_dense(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="sparsity"):
        DiagLinear.from_dense(lin, sparsity=0.99)


def test_construction_errors_name_the_problem():
    with pytest.raises(ValueError, match="sparsity=0.99 is outside"):
        DiagLinear(8, 8, sparsity=0.99)
    with pytest.raises(ValueError, match="duplicated"):
        DiagLinear(8, 8, offsets=[1, 1])
    with pytest.raises(ValueError, match="sorted"):
        DiagLinear(8, 8, offsets=[2, 1])
    with pytest.raises(ValueError, match="out of range"):
        DiagLinear(8, 8, offsets=[8])
    with pytest.raises(TypeError, match="int32 or int64"):
        DiagLinear(8, 8, offsets=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="in_features"):
        DiagLinear(0, 8)
    with pytest.raises(ValueError, match="sparsity=0.9 is outside \\[0, 0.875\\]"):
        DiagLinear(8, 8)  # the default 90% needs P >= 10 candidate diagonals
    with pytest.raises(ValueError, match="in_features=8"):
        DiagLinear(8, 4, sparsity=0.5)(torch.randn(2, 7))


def test_state_dict_round_trip_and_validation():
    a = DiagLinear(16, 32, sparsity=0.8)
    b = DiagLinear(16, 32, sparsity=0.8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 16)
    assert torch.equal(a(x), b(x)) and torch.equal(a.offsets, b.offsets)
    sd = a.state_dict()
    sd["offsets"] = sd["offsets"].long()  # older checkpoints: int64 is accepted and converted
    b.load_state_dict(sd)
    assert b.offsets.dtype == OFFSET_DTYPE
    sd["offsets"] = sd["offsets"].flip(0)
    with pytest.raises(RuntimeError, match="sorted"):
        b.load_state_dict(sd)


def test_set_offsets_keeps_k():
    layer = DiagLinear(8, 8, offsets=[0, 3])
    layer.set_offsets([1, 5])
    assert layer.offsets.tolist() == [1, 5] and torch.count_nonzero(layer.values) == 0
    with pytest.raises(ValueError, match="keeps k fixed"):
        layer.set_offsets([1, 2, 3])


def test_bf16_module_and_training_step():
    layer = DiagLinear(32, 16, dtype=torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert layer.values.grad.dtype == torch.bfloat16 and layer.bias.grad is not None


def test_builds_on_the_meta_device_for_deferred_init():
    for make in (lambda: DiagLinear(64, 256, device="meta"), lambda: DiagLinear(256, 64)):
        with torch.device("meta"):
            layer = make()
        assert layer.values.device.type == "meta" and layer.offsets.device.type == "meta"
    assert layer.row_fan_in().shape == (64,)  # in_features=256, out_features=64
    cpu = DiagLinear(64, 256, sparsity=0.8)  # tall: rows hold 0..k entries
    rows = [r for r, c in torch.nonzero(cpu.to_dense() != 0).tolist()]
    assert cpu.row_fan_in().tolist() == [rows.count(r) for r in range(256)]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda layer: setattr(layer, "offsets", torch.tensor([0, 2, 4, 9], dtype=torch.int32)), "out of range"),
        (lambda layer: setattr(layer, "offsets", torch.tensor([-1, 2, 4, 6])), "out of range"),
        (lambda layer: setattr(layer, "offsets", torch.tensor([1, 1, 4, 6])), "duplicated"),
        (lambda layer: layer.offsets.__setitem__(0, 8), "out of range"),  # edited in place
        (lambda layer: setattr(layer, "offsets", torch.tensor([1, 2, 3])), "k=3 diagonals but values has 4"),
    ],
)
def test_offsets_changed_behind_the_layers_back_are_checked_before_use(change, match):
    # Invalid offsets would wrap silently on the dense and reference paths: the forward checks a changed buffer.
    layer = DiagLinear(8, 8, offsets=[0, 2, 4, 6])
    x = torch.randn(3, 8)
    layer(x)
    change(layer)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(x)


def test_valid_new_offsets_are_used_and_functional_call_is_checked():
    layer = DiagLinear(8, 8, offsets=[0, 2, 4, 6])
    x = torch.randn(3, 8)
    layer(x)
    layer.offsets = torch.tensor([1, 3, 5, 7], dtype=torch.int32)
    want = x @ DiagLinear._assemble(layer.values.detach(), layer.offsets, layer.bias.detach(), 8, 8).to_dense().T
    assert rel_err(layer(x), want + layer.bias) < 1e-6
    with pytest.raises(ValueError, match="out of range"):
        torch.func.functional_call(layer, {"offsets": torch.tensor([0, 2, 4, 8])}, (x,))


def test_uninitialized_offsets_after_to_empty_are_refused():
    with torch.device("meta"):
        layer = DiagLinear(8, 8, sparsity=0.5)
    layer.to_empty(device="cpu")
    layer.offsets.fill_(-5)  # what to_empty may leave behind: memory that was never written
    with pytest.raises(ValueError, match="DiagLinear.offsets out of range"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("fill", [-5, 0])
def test_deferred_init_resets_then_loads_and_unset_offsets_are_named(fill):
    """The deferred-init idiom (meta, to_empty, reset_parameters, then load_state_dict; FSDP's param_init_fn)
    resets before it loads: reset_parameters must not refuse the uninitialized offsets. A forward before any load
    refuses them, and says where they came from."""
    from diagcompile.ops import evenly_spaced_offsets

    torch.manual_seed(0)
    trained = DiagLinear(8, 16, sparsity=0.5)
    with torch.device("meta"):
        layer = DiagLinear(8, 16, sparsity=0.5)
    layer.to_empty(device="cpu")
    layer.offsets.fill_(fill)  # never written: any bits, out of range (-5) or duplicated (0)
    layer.reset_parameters()
    with pytest.raises(ValueError, match=r"DiagLinear.offsets .*if the layer was built on the meta device.*to_empty"):
        layer(torch.randn(2, 8))
    layer.load_state_dict(trained.state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), trained(x), rtol=0, atol=0)
    layer.offsets.fill_(fill)
    layer.set_offsets(evenly_spaced_offsets(16, 8, layer.k))  # the other way the message names
    layer.reset_parameters()
    assert layer.values.abs().sum() > 0 and layer(torch.randn(2, 8)).shape == (2, 16)


def test_set_offsets_checks_values_before_changing_anything():
    layer = DiagLinear(8, 8, offsets=[0, 3, 5])
    before = (layer.offsets.clone(), layer.values.detach().clone())
    for bad in (torch.arange(8.0), torch.randn(1, 8), torch.randn(2, 8)):
        with pytest.raises(ValueError, match=r"values must have the layer's shape \(k, D\) = \(3, 8\)"):
            layer.set_offsets([1, 6, 7], values=bad)
        assert torch.equal(layer.offsets, before[0]) and torch.equal(layer.values, before[1])


def test_a_state_dict_of_the_transposed_shape_is_refused(tmp_path):
    # Bias-free 37->100 and 100->37 layers have tensors of the same shapes, (k, 37) and (k,): only the saved
    # (out, in) tells them apart, also after torch.save / torch.load(weights_only=True) and inside a model.
    a = nn.Sequential(DiagLinear(37, 100, bias=False, sparsity=0.5))
    b = nn.Sequential(DiagLinear(100, 37, bias=False, sparsity=0.5))
    assert a.state_dict()["0.values"].shape == b.state_dict()["0.values"].shape
    torch.save(a.state_dict(), tmp_path / "a.pt")
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    with pytest.raises(RuntimeError, match=r"\b0: saved from a DiagLinear with in_features=37, out_features=100"):
        b.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="loaded into one with in_features=100, out_features=37"):
        b.load_state_dict(sd, strict=False)
    c = nn.Sequential(DiagLinear(37, 100, bias=False, sparsity=0.5))
    c.load_state_dict(sd)
    assert torch.equal(c[0].values, a[0].values) and torch.equal(c[0].offsets, a[0].offsets)


def test_a_state_dict_of_another_sparsity_names_k_and_the_fix():
    # torch alone reports two size mismatches; the layer says what they mean and how to load the checkpoint.
    sd = nn.Sequential(DiagLinear(64, 96, sparsity=0.7)).state_dict()
    with pytest.raises(RuntimeError, match=r"\b0: the state_dict holds k=29 diagonals .* has k=48 .*offsets="):
        nn.Sequential(DiagLinear(64, 96, sparsity=0.5)).load_state_dict(sd)
    no_bias = {k: v for k, v in sd.items() if k != "0.bias"}
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*0\.bias.*k=29 diagonals"):  # torch's report too
        nn.Sequential(DiagLinear(64, 96, sparsity=0.5)).load_state_dict(no_bias)
    fixed = nn.Sequential(DiagLinear(64, 96, offsets=sd["0.offsets"]))
    fixed.load_state_dict(sd)
    assert torch.equal(fixed[0].values, sd["0.values"])


def test_numpy_scalars_and_arrays_are_accepted_as_plain_numbers():
    import numpy as np

    layer = DiagLinear(np.int64(64), np.int32(96), sparsity=np.float32(0.5))
    assert type(layer.in_features) is int and (layer.in_features, layer.out_features, layer.k) == (64, 96, 48)
    assert DiagLinear(16, 8, offsets=np.array([1, 2])).offsets.tolist() == [1, 2]
    for dtype in (np.int8, np.uint8, np.int16, np.uint64):
        assert DiagLinear(16, 8, offsets=np.array([1, 5], dtype=dtype)).offsets.tolist() == [1, 5]
    assert DiagLinear(16, 8, offsets=[np.int64(1), np.int64(3)]).offsets.tolist() == [1, 3]
    with pytest.raises(TypeError, match="offsets must be int32 or int64, got torch.float64"):
        DiagLinear(16, 8, offsets=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        DiagLinear(np.float64(16), 8)


def test_per_sample_gradients_and_ensembles_with_torch_func():
    # torch's per-sample-gradient recipe passes params and buffers through grad (the offsets buffer arrives
    # wrapped), and stack_module_state ensembles vmap over stacked offsets: both used to fail in the check.
    torch.manual_seed(0)
    model = nn.Sequential(DiagLinear(10, 6, sparsity=0.5), nn.ReLU(), DiagLinear(6, 3, sparsity=0.5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, t = torch.randn(5, 10), torch.randn(5, 3)

    def loss(params, buffers, x, t):
        y = torch.func.functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return (y - t.unsqueeze(0)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, t)
    for i in range(5):
        model.zero_grad()
        loss(dict(model.named_parameters()), buffers, x[i], t[i]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad)

    members = [DiagLinear(10, 6, sparsity=0.5) for _ in range(3)]  # different offsets per member
    p, bufs = torch.func.stack_module_state(members)
    y = torch.func.vmap(lambda p, b: torch.func.functional_call(members[0], (p, b), (x,)))(p, bufs)
    for i, m in enumerate(members):
        torch.testing.assert_close(y[i], m(x))


# ---- the forward reads what nn.Module attribute lookup would: parametrizations, functional_call, plain attributes
def _expected(layer: DiagLinear, x: torch.Tensor, values, offsets, bias) -> torch.Tensor:
    from diagcompile.functional import diag_linear

    return diag_linear(x, values, offsets, bias, layer.out_features)


def test_forward_uses_a_parametrized_tensor():
    # (A parametrization of `values` itself is impossible in torch: ParametrizationList is a ModuleDict, whose
    # .values() method the name would shadow. `bias` takes the same path: the class is swapped.)
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    layer, x = DiagLinear(12, 20, sparsity=0.5), torch.randn(3, 12)
    plain = layer.bias.detach().clone()
    parametrize.register_parametrization(layer, "bias", Double())
    assert type(layer) is not DiagLinear
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _expected(layer, x, layer.values, layer.offsets, 2 * plain))


def test_forward_under_functional_call_uses_the_swapped_tensors():
    layer, x = DiagLinear(20, 12, sparsity=0.5), torch.randn(3, 20)
    swapped = {
        "values": torch.randn_like(layer.values),
        "bias": torch.randn_like(layer.bias),
        "offsets": layer.offsets.flip(0).sort().values,  # same set, a new tensor object
    }
    out = torch.func.functional_call(layer, swapped, (x,))
    torch.testing.assert_close(out, _expected(layer, x, swapped["values"], swapped["offsets"], swapped["bias"]))
    assert not torch.allclose(out, layer(x))


def test_forward_uses_a_plain_bias_attribute_set_after_construction():
    layer, x = DiagLinear(8, 8, bias=False, sparsity=0.5), torch.randn(2, 8)
    layer.bias = torch.ones(8)  # not a registered parameter: a plain attribute, as nn.Module stores it
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _expected(layer, x, layer.values, layer.offsets, torch.ones(8)))


def test_layer_built_or_copied_under_inference_mode_runs():
    """Serving code builds layers under torch.inference_mode(); its tensors have no version counter."""
    with torch.inference_mode():
        layer = DiagLinear(32, 48, sparsity=0.5)
        x = torch.randn(4, 32)
        torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    plain = DiagLinear(32, 48, sparsity=0.5)
    with torch.inference_mode():
        copied = copy.deepcopy(plain)
        torch.testing.assert_close(copied(x), plain(x))
        copied.offsets = torch.full_like(copied.offsets, 48)  # a new buffer is still checked before use
        with pytest.raises(ValueError, match="out of range"):
            copied(x)


def test_jit_trace_of_a_fresh_layer_passes_its_sanity_check():
    # The first call validates and remembers the offsets; the trace's re-trace must record the same graph.
    layer = DiagLinear(16, 12, sparsity=0.5).eval()
    x = torch.randn(4, 16)
    traced = torch.jit.trace(layer, (x,))  # check_trace=True: traces twice and compares
    assert torch.equal(traced(x), layer(x))


def test_reading_weight_names_what_a_diag_linear_stores_instead():
    layer = DiagLinear(16, 12, sparsity=0.5)
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match=r"no dense 'weight'.*to_dense\(\).*filter_fn"):
        layer.weight  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):  # everything else as before
        layer.nonexistent  # noqa: B018


@pytest.mark.parametrize("bias", [True, False])
def test_to_linear_computes_the_same_function_and_from_dense_goes_back(bias):
    torch.manual_seed(0)
    layer = DiagLinear(12, 20, sparsity=0.75, bias=bias).double().eval()
    x = torch.randn(3, 12, dtype=torch.float64)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float64 and not linear.training
    assert linear.weight.requires_grad and (linear.bias is not None) == bias
    torch.testing.assert_close(linear(x), layer(x))
    back = DiagLinear.from_dense(linear, offsets=layer.offsets)
    assert torch.equal(back.values, layer.values) and torch.equal(back(x), layer(x))
    linear.weight.data.zero_()  # its own tensors, not views of the layer's
    assert layer.values.abs().sum() > 0


@pytest.mark.parametrize("kind", ["DiagLinear", "DynaDiagLinear"])
def test_torch_jit_script_is_refused_by_name(kind):
    """TorchScript's compiler would fail on the annotations ("Unknown type annotation: 'Tensor' at"), which
    does not say that scripting is the problem; trace and export are the ways out."""
    from diagcompile.dst import DynaDiagLinear

    layer = (
        DiagLinear(16, 16, sparsity=0.5) if kind == "DiagLinear" else DynaDiagLinear.from_linear(nn.Linear(16, 16), k=8)
    )
    with pytest.raises(TypeError, match=rf"{kind} does not support torch.jit.script.*torch.jit.trace.*torch.export"):
        torch.jit.script(nn.Sequential(nn.Linear(16, 16), layer))


def test_fx_symbolic_trace_records_one_call_per_layer_that_follows_the_module():
    """FX-based tooling (torchvision's create_feature_extractor, FX quantization, rewrite_traced on a model that
    already has DiagLinears) traces with torch.fx.symbolic_trace; the layer used to be traced into and fail with
    "x must be a Tensor, got Proxy"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), DiagLinear(20, 12, sparsity=0.5), DiagLinear(12, 30))
    x = torch.randn(3, 4, 12)
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "diag_linear" in n.target.__name__]
    assert len(calls) == 2
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with torch.no_grad():  # the graph reads the layers' tensors (get_attr), not copies taken at trace time
        model[2].values.mul_(2)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # The graph keeps the width check (a wide layer's values alone cannot tell a wrong width).
    with pytest.raises(ValueError, match="x has last dim 21 but in_features=20"):
        torch.fx.symbolic_trace(model[2])(torch.randn(3, 21))


def test_fx_graph_checks_each_offsets_tensor_once_per_version(monkeypatch):
    """The traced graph never calls the layer, whose forward checks its offsets once per version; it checked their
    contents on every call (~0.1 ms per layer on the CPU, a device sync on a GPU). Now once per version, as the
    layer does, and an in-place edit after tracing is still caught."""
    import diagcompile.modules as modules

    checked: list[bool] = []
    real = modules.diag_linear

    def spy(*args, check_offsets=True, **kwargs):
        checked.append(check_offsets)
        return real(*args, check_offsets=check_offsets, **kwargs)

    monkeypatch.setattr(modules, "diag_linear", spy)
    layer = DiagLinear(20, 12, sparsity=0.5)
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    x = torch.randn(3, 20)
    for _ in range(3):
        gm(x)
    assert checked == [True, False, False]
    with torch.no_grad():
        layer.offsets[1] = layer.offsets[0]  # an in-place edit after tracing: a new version, checked again
    with pytest.raises(ValueError, match="duplicate"):
        gm(x)


def test_compiled_code_reads_values_without_a_graph_break():
    """Dynamo traces DiagLinear.__getattr__ when compiled code reads .values; the parametrize guard there must
    not graph-break (sys._getframe did, which also kept the backend from inlining small layers)."""
    layer = DiagLinear(16, 16, sparsity=0.75)
    fn = torch.compile(lambda x: (x * layer.values.sum(0)).sum(-1), fullgraph=True, backend="eager")
    x = torch.randn(3, 16)
    torch.testing.assert_close(fn(x), (x * layer.values.sum(0)).sum(-1))


@pytest.mark.parametrize("bias_parametrized", [False, True])
def test_a_parametrization_of_values_is_refused_and_leaves_the_layer_intact(bias_parametrized):
    """torch cannot parametrize a tensor named ``values`` (its ModuleDict has a .values() method); it used to
    fail with "KeyError: attribute 'values' already exists" after deleting the layer's values parameter."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    layer, x = DiagLinear(12, 20, sparsity=0.5), torch.randn(3, 12)
    if bias_parametrized:
        parametrize.register_parametrization(layer, "bias", Double())
    cls, values = type(layer), layer.values
    with torch.no_grad():
        want = layer(x)

    class Exp(nn.Module):  # its right_inverse rewrites the tensor in place when torch registers it
        def forward(self, t):
            return t.exp()

        def right_inverse(self, t):
            return t.log()

    before = values.detach().clone()
    for add in (
        lambda: parametrize.register_parametrization(layer, "values", Double()),
        lambda: parametrize.register_parametrization(layer, "values", Exp()),
        lambda: torch.nn.utils.parametrizations.orthogonal(layer, name="values"),
        lambda: torch.nn.utils.parametrizations.weight_norm(layer, name="values"),
        lambda: torch.nn.utils.parametrizations.spectral_norm(layer, name="values"),
    ):
        with pytest.raises(TypeError, match=r"values cannot be parametrized.*ModuleDict.*layer is unchanged"):
            add()
        assert type(layer) is cls and layer._parameters["values"] is values
        assert torch.equal(values.detach(), before)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    del layer.values  # deleting the parameter is still allowed elsewhere
    assert "values" not in layer._parameters


@pytest.mark.parametrize("strict", [True, False])
def test_offsets_without_their_values_are_refused_when_they_would_move_the_values(strict):
    """Offsets without values (strict=False) used to load: the layer's values then lay on other diagonals, a
    silently different function. Refused, the layer unchanged; the same offsets alone change nothing and load."""
    torch.manual_seed(0)
    sd = nn.Sequential(DiagLinear(16, 16, sparsity=0.75)).state_dict()
    del sd["0.values"]
    model = nn.Sequential(DiagLinear(16, 16, sparsity=0.75))
    assert not torch.equal(model[0].offsets, sd["0.offsets"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"has 0.offsets but no 0.values, and its offsets differ"):
        model.load_state_dict(sd, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.load_state_dict({"0.offsets": before["0.offsets"]}, strict=False)  # its own offsets: nothing moves


def test_parameters_only_and_pruned_or_normed_checkpoints_load():
    """What the half-layer check must let through: a parameters-only checkpoint (EMA, trainable-only saves; torch's
    missing_keys names the offsets), and the state of a layer whose values prune / weight_norm / spectral_norm
    keep under other names (values_orig, values_g, ...), which holds offsets but no 'values' key."""
    torch.manual_seed(0)
    src, dst = DiagLinear(16, 16, sparsity=0.75), DiagLinear(16, 16, sparsity=0.75)
    dst.load_state_dict(dict(src.state_dict()))  # same diagonals ...
    with torch.no_grad():
        src.values.mul_(3)  # ... new values
    result = dst.load_state_dict(dict(src.named_parameters()), strict=False)
    assert result.missing_keys == ["offsets"] and torch.equal(dst.values, src.values)
    x = torch.randn(4, 16)
    for name, apply in (
        ("prune", lambda m: torch.nn.utils.prune.l1_unstructured(m, "values", amount=0.3)),
        ("weight_norm", lambda m: torch.nn.utils.weight_norm(m, name="values")),
        ("spectral_norm", lambda m: torch.nn.utils.spectral_norm(m, name="values")),
    ):
        a, b = apply(DiagLinear(16, 16, sparsity=0.75)), apply(DiagLinear(16, 16, sparsity=0.75))
        a.eval(), b.eval()
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0, msg=name)


def test_a_dense_checkpoint_for_a_diag_linear_says_how_to_convert():
    dense = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    sparse = nn.Sequential(DiagLinear(16, 24, sparsity=0.75), nn.ReLU(), nn.Linear(24, 8))
    msg = r"^0: the state_dict holds a dense weight \(24, 16\).*not loaded.*sparsify_"
    with pytest.warns(UserWarning, match=msg) as w:
        result = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert w[0].filename == __file__, f"the warning points into {w[0].filename}, not at the load_state_dict call"
    nested = nn.Sequential(nn.Sequential(sparse))
    with pytest.warns(UserWarning, match="dense weight") as w:
        nested.load_state_dict(nn.Sequential(nn.Sequential(dense)).state_dict(), strict=False)
    assert w[0].filename == __file__, "at any depth of nesting"
    assert set(result.missing_keys) == {"0.values", "0.offsets"} and result.unexpected_keys == ["0.weight"]
    with pytest.warns(UserWarning, match="dense weight"), pytest.raises(RuntimeError, match="Missing key"):
        sparse.load_state_dict(dense.state_dict())


@pytest.mark.slow
def test_trains_under_fsdp2_like_one_process(tmp_path):
    """Two gloo ranks with every layer ``fully_shard``-ed end with the parameters of one process on the global
    batches. FSDP2 frees and re-allocates the unsharded parameters' storage around each forward; the CPU kernels
    read tensors by address, where ``Tensor.numpy()`` marked the storage not resizable ("Trying to resize
    storage that is not resizable" at the first free)."""
    worker = pathlib.Path(__file__).with_name("fsdp_worker.py")
    # A script file, not `python -c`: torch.multiprocessing's spawn re-imports the main module by path.
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single, *ranks = (torch.load(tmp_path / f, weights_only=True) for f in ("single.pt", "rank0.pt", "rank1.pt"))
    for rank in ranks:
        for name, expected in single["final"].items():
            torch.testing.assert_close(rank["final"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("0.values", "2.values", "0.bias"):
        assert not torch.equal(single["final"][name], single["init"][name]), f"{name} did not train"
