"""MaskSparsifier (RigL, SRigL, N:M SR-STE / mask decay / structure decay) and make_sparsifier."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagcompile import mark_sparse
from diagcompile.dst import (
    SPARSIFIER_METHODS,
    DiagSparsifier,
    DSTConfig,
    MaskConfig,
    MaskedLinear,
    MaskSparsifier,
    config_class,
    make_config,
    make_sparsifier,
)
from diagcompile.ops import k_from_sparsity
from diagcompile.testing import not_head, tiny_mlp
from diagcompile.testing import toy_batch as _batch
from diagcompile.testing import train_toy as _train

METHODS = ["rigl", "srigl", "nm-srste", "nm-mask-decay", "nm-structure-decay"]
NM = [m for m in METHODS if m.startswith("nm-")]


def _make(method, opt="adamw", seed=0, filter_fn=not_head, **cfg):
    torch.manual_seed(seed)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    elif opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = None
    cfg = {"total_steps": 40, "sparsity": 0.8, "update_every": 5, **cfg}
    if config_class(method) is MaskConfig:
        cfg.setdefault("seed", 0)
    sp = make_sparsifier(model, optimizer, method, filter_fn=filter_fn, **cfg)
    return model, optimizer, sp


def _fwd_bwd(model, t):
    x, y = _batch(t)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss


def _topk_mask(w, n, m):
    """Independent N:M mask via topk (random weights: no ties)."""
    o, i = w.shape
    idx = w.detach().abs().view(o, i // m, m).topk(n, dim=-1).indices
    return torch.zeros(o, i // m, m, dtype=torch.bool).scatter_(-1, idx, True).view(o, i)


def _check_pattern(sp, method):
    diag = sp.diagnostics()
    for fqn, layer in sp.layers.items():
        rec = next(r for r in sp._layers if r.fqn == fqn)
        mask, w = layer.mask, layer.weight.detach()
        if method == "rigl":
            assert int(mask.sum()) == rec.target_nnz, fqn
            assert (w[~mask] == 0).all(), f"{fqn}: a pruned weight is non-zero"
        elif method == "srigl":
            rows = mask.sum(1)
            assert (rows[~rec.ablated] == rec.fan_in).all() and (rows[rec.ablated] == 0).all(), fqn
            assert (w[~mask] == 0).all(), f"{fqn}: a pruned weight is non-zero"
            assert rec.fan_in * int((~rec.ablated).sum()) <= rec.target_nnz
        else:
            n, m = layer.nm_n, layer.nm_m
            assert (mask.view(mask.shape[0], -1, m).sum(-1) == n).all(), fqn
            assert torch.equal(mask, _topk_mask(w, n, m)), f"{fqn}: the mask is not the N:M top of |W|"
            assert diag[fqn]["nm_n"] == n and diag[fqn]["density"] == n / m


# ----------------------------------------------------------------------------------------------------
# make_sparsifier
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", SPARSIFIER_METHODS)
def test_make_sparsifier_builds_every_method(method):
    model, opt, sp = _make(method, total_steps=10)
    expected = DiagSparsifier if method in ("dynadiag", "diagheur") else MaskSparsifier
    assert type(sp) is expected and sp.config.method == method
    assert isinstance(sp.config, config_class(method))
    assert set(sp.layers) == {"body.0", "body.2"} and type(model.head) is nn.Linear
    _train(model, opt, sp, 3)
    assert set(sp.diagnostics()) == {"body.0", "body.2"}


def test_make_sparsifier_rejects_unknown_methods_and_options():
    assert SPARSIFIER_METHODS == (
        "dynadiag",
        "diagheur",
        "rigl",
        "srigl",
        "nm-srste",
        "nm-mask-decay",
        "nm-structure-decay",
    )
    assert config_class("rigl") is MaskConfig and config_class("dynadiag") is DSTConfig
    with pytest.raises(ValueError, match="unknown sparse training method 'set'"):
        make_sparsifier(tiny_mlp(), None, "set", 0.9, 10)
    with pytest.raises(ValueError, match=r"\['pool'\] do not apply to method 'rigl'"):
        make_sparsifier(tiny_mlp(), None, "rigl", 0.9, 10, pool=2.0)
    with pytest.raises(ValueError, match=r"\['gamma_sal'\] do not apply to method 'dynadiag'"):
        make_sparsifier(tiny_mlp(), None, "dynadiag", 0.9, 10, gamma_sal=0.3)


# ----------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_conversion_keeps_parameters_keys_and_optimizer(method):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    groups = [list(g["params"]) for g in opt.param_groups]
    MaskSparsifier(model, opt, MaskConfig(total_steps=10, method=method, sparsity=0.8), filter_fn=not_head)
    assert list(model.state_dict()) == keys, "model state-dict keys stay those of nn.Linear"
    assert all(p is params[n] for n, p in model.named_parameters()), "the same Parameter objects"
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert isinstance(model.body[0], MaskedLinear) and isinstance(model.body[0], nn.Linear)
    assert type(model.head) is nn.Linear


def test_initial_masks_budgets_and_rescaled_init():
    torch.manual_seed(0)
    ref = tiny_mlp(n_in=16, hidden=32, n_out=5)
    model = copy.deepcopy(ref)
    sp = MaskSparsifier(model, None, MaskConfig(total_steps=10, method="rigl", sparsity=0.8, seed=1), not_head)
    for fqn, (n_out, n_in) in {"body.0": (32, 16), "body.2": (32, 32)}.items():
        nnz = k_from_sparsity(n_out, n_in, 0.8) * min(n_out, n_in)  # the diagonal layer's non-zeros
        layer = sp.layers[fqn]
        assert int(layer.mask.sum()) == nnz
        fan = layer.mask.sum(1, keepdim=True).double()
        dense = ref.get_submodule(fqn).weight.detach().double()
        expected = torch.where(layer.mask, dense * (n_in / fan.clamp_min(1)).sqrt(), torch.zeros_like(dense))
        assert torch.allclose(layer.weight.detach().double(), expected, rtol=1e-6, atol=0)
    # the same seed gives the same masks; another seed other masks
    again = copy.deepcopy(ref)
    sp2 = MaskSparsifier(again, None, MaskConfig(total_steps=10, method="rigl", sparsity=0.8, seed=1), not_head)
    assert torch.equal(sp2.layers["body.2"].mask, sp.layers["body.2"].mask)
    other = copy.deepcopy(ref)
    sp3 = MaskSparsifier(other, None, MaskConfig(total_steps=10, method="rigl", sparsity=0.8, seed=2), not_head)
    assert not torch.equal(sp3.layers["body.2"].mask, sp.layers["body.2"].mask)
    # budget="floor" is RigL's floor((1 - s) * N); rescale_init=False keeps the masked dense init
    plain = copy.deepcopy(ref)
    cfg = MaskConfig(total_steps=10, method="rigl", sparsity=0.8, budget="floor", rescale_init=False, seed=1)
    sp4 = MaskSparsifier(plain, None, cfg, not_head)
    layer = sp4.layers["body.0"]
    assert int(layer.mask.sum()) == math.floor(0.2 * 32 * 16)
    assert torch.equal(layer.weight.detach(), ref.body[0].weight.detach() * layer.mask)


def test_srigl_initial_fan_in_and_nm_patterns():
    _, _, sp = _make("srigl")
    assert sp.layers["body.0"].mask.sum(1).tolist() == [112 // 32] * 32  # floor(budget / N_out)
    assert sp.layers["body.2"].mask.sum(1).tolist() == [7] * 32
    _, _, sp = _make("nm-srste")
    d = sp.diagnostics()
    # budget density 0.21875 (7 of 32 diagonals): fan-in 16 -> 1:4 (0.25; 1:4, 2:8, 4:16 tie), fan-in 32 -> 7:32
    assert (d["body.0"]["nm_n"], d["body.0"]["nm_m"], d["body.2"]["nm_n"], d["body.2"]["nm_m"]) == (1, 4, 7, 32)
    _, _, sp = _make("nm-srste", sparsity=0.75, nm_m=8, nm_n=2)
    assert {(lay.nm_n, lay.nm_m) for lay in sp.layers.values()} == {(2, 8)}


def test_an_explicit_nm_records_the_sparsity_it_trains():
    # make_sparsifier(..., "nm-srste", 0.9, nm_n=2, nm_m=4) trained 2:4 while config.sparsity said 0.9
    with pytest.raises(ValueError, match=r"sparsity=0\.9 contradicts nm_n=2, nm_m=4"):
        _make("nm-srste", sparsity=0.9, nm_n=2, nm_m=4)
    _, _, sp = _make("nm-srste", sparsity=0.5, nm_n=2, nm_m=4)
    assert sp.config.sparsity == 0.5
    assert all(d["density"] == 1 - sp.config.sparsity for d in sp.diagnostics().values())


def test_erk_redistributes_the_same_total():
    _, _, uni = _make("rigl")
    _, _, erk = _make("rigl", distribution="erk")
    du, de = uni.diagnostics(), erk.diagnostics()
    assert sum(d["nnz"] for d in de.values()) <= sum(d["nnz"] for d in du.values())
    assert sum(d["nnz"] for d in de.values()) >= sum(d["nnz"] for d in du.values()) - 2
    # ER ratio (32 + 16) / (32 * 16) > (32 + 32) / (32 * 32): the narrower layer is denser
    assert de["body.0"]["density"] > de["body.2"]["density"]
    _, _, s_erk = _make("srigl", distribution="erk")
    assert s_erk.diagnostics()["body.0"]["fan_in"] > 3


def test_conversion_errors_leave_the_model_untouched():
    # (the checks both sparsifiers share are in tests/dst/test_base.py)
    checks = [
        (tiny_mlp(n_in=15), {"method": "nm-srste", "nm_m": 4}, "layer 'body.0'.*divide the fan-in 15"),
        (tiny_mlp(n_in=37, hidden=40), {"method": "nm-srste"}, "layer 'body.0'.*nm_m"),
        (tiny_mlp(hidden=8), {"method": "rigl", "sparsity": 0.99}, "layer 'body.0'.*0.99"),
        (tiny_mlp(n_in=64, hidden=128), {"method": "srigl", "sparsity": 0.995, "budget": "floor"}, "fan-in"),
        (tiny_mlp(), {"method": "srigl", "no_ablation": ("body.9",)}, "body.9"),
    ]
    for m, kw, match in checks:
        with pytest.raises(ValueError, match=match):
            MaskSparsifier(m, None, MaskConfig(total_steps=10, **kw))
        assert not any(isinstance(x, MaskedLinear) for x in m.modules()), "nothing converted on error"
    marked = tiny_mlp()
    mark_sparse(marked.body[0], offsets=[0, 3])
    with pytest.raises(ValueError, match="explicit diagonal offsets"):
        MaskSparsifier(marked, None, MaskConfig(total_steps=10))
    outside = tiny_mlp()
    opt = torch.optim.SGD(outside.head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in any param group"):
        MaskSparsifier(outside, opt, MaskConfig(total_steps=10))


def test_a_sparsity_beyond_one_diagonal_explains_the_budget():
    # "outside [0, 0.96875] ... P=32 candidate diagonals: one diagonal kept" told a RigL user about diagonals only
    def body0(m, fqn):  # 32x16: P = 32, N_in = 16
        return fqn == "body.0"

    with pytest.raises(ValueError) as e:
        MaskSparsifier(tiny_mlp(), None, MaskConfig(total_steps=10, method="rigl", sparsity=0.99), body0)
    msg = str(e.value)
    assert "'body.0' (32x16): sparsity=0.99 is outside [0, 0.96875]" in msg
    assert "budget='diagonal' (the default) gives rigl the non-zero count of the DynaDiag/DiagHeur layer" in msg
    assert "budget='floor'" in msg and "up to 1 - 1/(N_out * N_in) = 0.998047 here" in msg
    floor = MaskConfig(total_steps=10, method="rigl", sparsity=0.998, budget="floor")  # what the message promises
    assert MaskSparsifier(tiny_mlp(), None, floor, body0).diagnostics()["body.0"]["nnz"] == 1
    # SRigL keeps one weight per neuron under either budget: the message says floor does not help
    with pytest.raises(ValueError, match=r"would not go further for SRigL.*1 - 1/N_in = 0\.9375 here"):
        MaskSparsifier(tiny_mlp(), None, MaskConfig(total_steps=10, method="srigl", sparsity=0.99), body0)
    floor = MaskConfig(total_steps=10, method="srigl", sparsity=0.94, budget="floor")
    with pytest.raises(ValueError, match="no constant fan-in"):
        MaskSparsifier(tiny_mlp(), None, floor, body0)
    with pytest.raises(ValueError, match=r"no sparser than 1:M \(M <= nm_max_m=32\)"):
        MaskSparsifier(tiny_mlp(), None, MaskConfig(total_steps=10, method="nm-srste", sparsity=0.99), body0)


@pytest.mark.parametrize("method", METHODS)
def test_a_frozen_weight_is_refused_before_anything_changes(method):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    model.body[2].weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"'body.2'.*requires_grad=False.*filter_fn"):
        make_sparsifier(model, opt, method, 0.5, 10, filter_fn=not_head)
    assert not any(isinstance(x, MaskedLinear) for x in model.modules()), "a layer was converted before the error"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "weights changed before the error"
    # excluded, the frozen layer stays a plain nn.Linear and the others train
    sp = make_sparsifier(model, opt, method, 0.5, 10, filter_fn=lambda m, fqn: fqn == "body.0")
    assert set(sp.layers) == {"body.0"}


def test_make_config_names_the_reserved_options():
    for key in ("method", "sparsity", "total_steps"):
        with pytest.raises(ValueError, match=rf"'{key}'.*argument"):
            make_config("dynadiag", 0.5, 10, **{key: 0.5})


def test_marks_select_layers_and_set_their_sparsity():
    model = tiny_mlp()
    mark_sparse(model.body[2], sparsity=0.5)
    sp = MaskSparsifier(model, None, MaskConfig(total_steps=10, sparsity=0.9))
    assert set(sp.layers) == {"body.2"}
    assert sp.diagnostics()["body.2"]["nnz"] == k_from_sparsity(32, 32, 0.5) * 32


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_erk_refuses_a_mark_with_its_own_sparsity(method):
    # ERK redistributed the budget over every layer: mark_sparse(body.2, sparsity=0.5) trained at another density
    model = tiny_mlp()
    mark_sparse(model.body[0], sparsity=0.9)
    mark_sparse(model.body[2], sparsity=0.5)
    cfg = MaskConfig(total_steps=10, method=method, sparsity=0.9, distribution="erk")
    with pytest.raises(ValueError, match=r"'erk'.*'body\.2' \(0\.5\) \(sparsity=0\.9\).*'uniform'.*sparsity=0\.9"):
        MaskSparsifier(model, None, cfg)
    assert not any(isinstance(x, MaskedLinear) for x in model.modules()), "nothing converted on error"
    mark_sparse(model.body[2], sparsity=0.9)  # marks that only select layers are fine
    assert set(MaskSparsifier(model, None, cfg).layers) == {"body.0", "body.2"}


# ----------------------------------------------------------------------------------------------------
# RigL / SRigL steps
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_pattern_holds_after_every_step(method):
    model, opt, sp = _make(method)
    _check_pattern(sp, method)
    changed = []
    _train(model, opt, sp, 40, check=lambda t: (_check_pattern(sp, method), changed.append(sp.diagnostics())))
    total = sum(d["mask_changed_total"] for d in changed[-1].values())
    assert total > 0, "the topology never changed: the test would prove nothing"


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_gradients_are_masked_and_the_dense_gradient_is_captured_only_before_updates(method):
    model, opt, sp = _make(method)
    layer = model.body[2]
    seen = {}

    def save_input(mod, inp, out):
        seen["x"] = inp[0].detach()
        out.register_hook(lambda g: seen.__setitem__("dy", g.detach()))

    layer.register_forward_hook(save_input)
    rec = next(r for r in sp._layers if r.fqn == "body.2")
    for t in range(12):
        _fwd_bwd(model, t)
        assert (layer.weight.grad[~layer.mask] == 0).all(), "the gradient of pruned weights is masked"
        update = (t + 1) % 5 == 0
        if update:
            dense = seen["dy"].t() @ seen["x"]
            assert rec.dense_grad is not None and torch.allclose(rec.dense_grad, dense, rtol=1e-5, atol=1e-7)
        else:
            assert rec.dense_grad is None, f"step {t + 1}: no dense gradient outside update steps"
        opt.step()
        sp.step()
        opt.zero_grad()
        assert rec.dense_grad is None, "freed after the step"


@pytest.mark.parametrize("method", ["rigl", "srigl"])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_regrown_weights_and_their_optimizer_state_start_at_zero(method, opt_name):
    model, opt, sp = _make(method, opt=opt_name, drop_fraction=0.5)
    _train(model, opt, sp, 4)
    layer = model.body[2]
    old = layer.mask.clone()
    _fwd_bwd(model, 4)
    opt.step()
    after_opt = layer.weight.detach().clone()
    sp.step()  # step 5: an update
    opt.zero_grad()
    new = layer.mask
    grown, kept = new & ~old, new & old
    assert grown.any() and (old & ~new).any()
    w = layer.weight.detach()
    assert (w[grown] == 0).all() and (w[~new] == 0).all()
    assert torch.equal(w[kept], after_opt[kept]), "surviving weights are untouched by the update"
    state = opt.state[layer.weight]
    names = ["exp_avg", "exp_avg_sq"] if opt_name == "adamw" else ["momentum_buffer"]
    for name in names:
        assert (state[name][grown] == 0).all() and (state[name][~new] == 0).all(), name
        assert state[name][kept].abs().sum() > 0, f"{name}: kept entries keep their state"
    assert sp.diagnostics()["body.2"]["mask_changed"] == int(grown.sum())


class _Drift(torch.optim.Optimizer):
    """An optimizer that moves every weight, gradient or not, and keeps per-element state (worst case)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.add_(1.0)
                p.add_(group["lr"] * buf)


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_masks_hold_whatever_the_optimizer_does(method):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = _Drift(model.parameters())
    sp = MaskSparsifier(model, opt, MaskConfig(total_steps=20, method=method, sparsity=0.8, update_every=5), not_head)
    for t in range(12):
        before = {f: m.mask.clone() for f, m in sp.layers.items()}
        _fwd_bwd(model, t)
        opt.step()
        sp.step()
        opt.zero_grad()
        for fqn, layer in sp.layers.items():
            off, grown = ~layer.mask, layer.mask & ~before[fqn]
            buf = opt.state[layer.weight]["buf"]
            assert (layer.weight[off] == 0).all() and (buf[off] == 0).all()
            assert (buf[grown] == 0).all() and (layer.weight[grown] == 0).all()
            assert (buf[layer.mask & before[fqn]] > 0).all()
        assert any((m.mask != before[f]).any() for f, m in sp.layers.items()) == ((t + 1) % 5 == 0)
    _check_pattern(sp, method)


def test_rigl_update_is_the_rule_applied_to_the_global_gradient():
    from diagcompile.dst.mask_rules import rigl_drop_grow

    model, opt, sp = _make("rigl")
    _train(model, opt, sp, 4)
    layer, rec = model.body[2], next(r for r in sp._layers if r.fqn == "body.2")
    old = layer.mask.clone()
    _fwd_bwd(model, 4)
    opt.step()
    grad, w = rec.dense_grad.clone(), layer.weight.detach().clone()
    sp.step()
    n = math.floor(0.3 / 2 * (1 + math.cos(math.pi * 5 / 30)) * int(old.sum()))
    assert torch.equal(layer.mask, rigl_drop_grow(old, w, grad, n))
    assert sp.diagnostics()["body.2"]["updates"] == 1


def test_no_update_after_t_end_and_frozen_flag():
    model, opt, sp = _make("rigl", total_steps=40, update_end=0.5)  # updates at 5, 10, 15
    masks = []
    _train(model, opt, sp, 40, check=lambda t: masks.append(sp.layers["body.2"].mask.clone()))
    changes = [t + 1 for t in range(1, 40) if not torch.equal(masks[t], masks[t - 1])]
    assert changes and max(changes) <= 15 and set(changes) <= {5, 10, 15}
    assert sp.diagnostics()["body.2"]["frozen"] == 1.0 and sp.diagnostics()["body.2"]["updates"] <= 3


def _kill_neuron(layer, i):
    with torch.no_grad():
        layer.weight[i] *= 1e-6
        layer.bias[i] = -100.0  # ReLU never fires: no gradient reaches its weights


def test_srigl_ablates_a_dead_neuron_but_not_a_protected_one():
    model, opt, sp = _make("srigl", no_ablation=("body.2",))
    _kill_neuron(model.body[0], 3)
    _kill_neuron(model.body[2], 7)
    _train(model, opt, sp, 5)
    d = sp.diagnostics()
    ablated = {r.fqn: r.ablated for r in sp._layers}
    assert ablated["body.0"].nonzero().squeeze(1).tolist() == [3]
    assert d["body.0"]["active_neurons"] == 31 and d["body.0"]["fan_in"] == 112 // 31
    assert not ablated["body.2"].any() and model.body[2].mask[7].sum() == 7
    _check_pattern(sp, "srigl")


def test_srigl_never_ablates_the_last_linear():
    # Every layer sparse, an absolute threshold no neuron reaches: unprotected layers shrink to the safeguard,
    # the head (the model's last nn.Linear) keeps all its neurons.
    model, opt, sp = _make("srigl", filter_fn=None, gamma_sal=1000.0, sparsity=0.5)
    _train(model, opt, sp, 5)
    d = sp.diagnostics()
    for fqn, (n_out, n_in) in {"body.0": (32, 16), "body.2": (32, 32)}.items():
        budget = k_from_sparsity(n_out, n_in, 0.5) * min(n_out, n_in)
        alive = d[fqn]["active_neurons"]
        # the safeguard keeps the ceil(budget / N_in) most salient neurons (and any tied with the last of them)
        assert math.ceil(budget / n_in) <= alive < n_out, fqn
        assert d[fqn]["fan_in"] == min(n_in, budget // alive)
    assert d["head"]["active_neurons"] == 5 and d["head"]["fan_in"] == 16
    # without ablation the same run keeps every neuron
    model, opt, sp = _make("srigl", filter_fn=None, gamma_sal=1000.0, sparsity=0.5, ablation=False)
    _train(model, opt, sp, 5)
    d = sp.diagnostics()
    assert {f: d[f]["active_neurons"] for f in d} == {"body.0": 32, "body.2": 32, "head": 5}


def test_an_ablated_neuron_is_a_constant_unit_that_folds_into_the_next_bias():
    # The digest (baselines.md A9) said the next layer receives zeros from ablated channels; the bias trains on,
    # so it receives act(bias). The documented way to slice them away: fold that constant into the next bias.
    model, opt, sp = _make("srigl", filter_fn=None, gamma_sal=1000.0, sparsity=0.5)
    _train(model, opt, sp, 5)
    dead = sp._layers[0].ablated
    assert sp._layers[0].fqn == "body.0" and dead.any()
    model = sp.finalize()
    first, second = model.body[0], model.body[2]
    x = torch.randn(7, 16)
    with torch.no_grad():
        h = torch.relu(first(x))
        const = torch.relu(first.bias[dead])
        assert torch.equal(h[:, dead], const.expand(7, -1)) and bool(const.any()), "a constant, not zero"
        folded = second.bias + second.weight[:, dead] @ const
        sliced = F.linear(h[:, ~dead], second.weight[:, ~dead], folded)
        torch.testing.assert_close(sliced, second(h))
    doc = " ".join(MaskConfig.__doc__.split())
    assert "it is a *constant* unit: it outputs ``act(bias)``, not zero" in doc
    assert "fold their constant output into the next layer's bias first" in doc


class _HeadFirst(nn.Module):
    """16 -> 5 with the head registered first and an ``nn.MultiheadAttention`` (whose ``out_proj`` its forward
    never calls) registered last: the registration order names neither as the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        h = self.body(x)[:, None]
        return self.head((h + self.att(h, h, h)[0])[:, 0])


def test_srigl_protects_the_layer_the_forward_runs_last_whatever_the_registration_order():
    torch.manual_seed(0)
    model = _HeadFirst()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = make_sparsifier(model, opt, "srigl", sparsity=0.5, total_steps=40, update_every=5, gamma_sal=1000.0, seed=0)
    assert set(sp.layers) == {"head", "body.0", "body.2"}
    _train(model, opt, sp, 5)
    d = sp.diagnostics()
    assert d["head"]["active_neurons"] == 5  # every class keeps its weights
    assert d["body.0"]["active_neurons"] < 32 and d["body.2"]["active_neurons"] < 32
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # the watch ended
    # The decision is part of the state: a fresh sparsifier protects the head before any forward runs.
    state = sp.state_dict()
    assert state["head"] == "head"
    torch.manual_seed(0)
    model2 = _HeadFirst()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sp2 = make_sparsifier(model2, opt2, "srigl", sparsity=0.5, total_steps=40, update_every=5, gamma_sal=1000.0, seed=0)
    sp2.load_state_dict(state)
    assert [r.fqn for r in sp2._layers if r.protected] == ["head"]


class _Checkpointed(nn.Module):
    """16 -> 5 whose two blocks run under activation checkpointing (re-run during backward, last one first)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16 if i == 0 else 32, 32), nn.ReLU()) for i in range(2)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        for blk in self.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return self.head(x)


def test_srigl_head_watch_ignores_checkpoint_recomputation_and_keeps_the_model_picklable():
    torch.manual_seed(0)
    model = _Checkpointed()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = make_sparsifier(model, opt, "srigl", sparsity=0.5, total_steps=40, update_every=5, gamma_sal=1000.0, seed=0)
    copy_before = copy.deepcopy(model)  # an EMA / teacher copy made before the first update
    torch.save(model, io.BytesIO())  # the watching hooks pickle
    _train(model, opt, sp, 5)
    assert sp.state_dict()["head"] == "head" and sp.diagnostics()["head"]["active_neurons"] == 5
    last = sp._last_linear
    copy_before(torch.randn(2, 16))  # the copy's hooks are inert
    assert sp._last_linear == last
    torch.save(copy_before, io.BytesIO())


@pytest.mark.parametrize("method", ["rigl", "nm-srste"])
def test_training_without_the_optimizer_warns_at_the_first_step(method):
    # optimizer=None manages no optimizer state: grown connections would keep stale Adam moments.
    model, _, sp = _make(method, opt=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built afterwards, as a user might
    _fwd_bwd(model, 0)
    opt.step()
    with pytest.warns(UserWarning, match="optimizer=None but its layers are being trained"):
        sp.step()
    # inference-only use (no gradients) stays quiet
    model, _, sp = _make(method, opt=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.step()


def test_nm_warns_when_the_closest_pattern_is_far_from_the_requested_density():
    with pytest.warns(UserWarning, match=r"closest N:M pattern to density 0\.1.* is 1:4 \(density 0\.2500\)"):
        _make("nm-srste", sparsity=0.9, nm_m=4)
    with warnings.catch_warnings():  # 3:16 for 80% is close enough
        warnings.simplefilter("error")
        _make("nm-srste", sparsity=0.8)


def test_no_update_warning_names_masks_not_diagonals():
    with pytest.warns(UserWarning, match="trains the initial random masks only"):
        _make("rigl", total_steps=10, update_every=100)


# ----------------------------------------------------------------------------------------------------
# N:M family
# ----------------------------------------------------------------------------------------------------
def _single(method, n=1, m=4, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 3))
    cfg = MaskConfig(total_steps=40, method=method, sparsity=1 - n / m, nm_n=n, nm_m=m, **cfg)
    sp = MaskSparsifier(model, None, cfg)
    return model, sp


@pytest.mark.parametrize(
    "method, cfg",
    [
        ("nm-srste", {}),
        ("nm-mask-decay", {"mask_decay_grad": "scaled", "mask_decay_c": 0.1}),
        ("nm-mask-decay", {"mask_decay_grad": "ste", "mask_decay_c": 0.1}),
        ("nm-structure-decay", {}),
    ],
)
def test_nm_forward_and_gradient_semantics(method, cfg):
    model, sp = _single(method, **cfg)
    for _ in range(3):
        sp.step()
    layer = model[0]
    w = layer.weight.detach().clone()
    n = layer.nm_n
    E = _topk_mask(w, n, 4)
    beta = math.exp(-0.3) if method == "nm-mask-decay" else 0.0
    assert float(layer.beta) == pytest.approx(beta)
    scale = E.float() + beta * (~E).float()
    x, r = torch.randn(6, 8), torch.randn(6, 3)
    y = model(x)
    assert torch.allclose(y, x @ (w * scale).t() + layer.bias.detach(), atol=1e-6)
    (y * r).sum().backward()
    dw_eff = r.t() @ x
    if method == "nm-srste":
        expected = dw_eff + 2e-4 * w * (~E)
    elif method == "nm-mask-decay" and cfg["mask_decay_grad"] == "scaled":
        expected = dw_eff * scale
    else:
        expected = dw_eff
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)
    if method != "nm-srste":
        assert not torch.allclose(layer.weight.grad, dw_eff + 2e-4 * w * (~E)), "the test distinguishes them"


def test_mask_decay_beta_schedule():
    model, opt, sp = _make("nm-mask-decay", mask_decay_c=0.05)  # T_end = 30
    betas = []
    _train(model, opt, sp, 40, check=lambda t: betas.append(float(model.body[0].beta)))
    expected = [math.exp(-0.05 * t) if t < 30 else 0.0 for t in range(1, 41)]
    assert betas == pytest.approx(expected, rel=1e-6)
    model, opt, sp = _make("nm-mask-decay")  # default c = 10 / T_end
    _train(model, opt, sp, 29)
    assert float(model.body[0].beta) == pytest.approx(math.exp(-10 / 30 * 29), rel=1e-5)


def test_structure_decay_frames_in_training():
    model, opt, sp = _make("nm-structure-decay")  # T_end = 30; body.0 1:4 -> [3, 2, 1]; body.2 7:32 -> [31, 16, 8, 7]
    seen = []

    def check(t):
        seen.append((model.body[0].nm_n, model.body[2].nm_n))
        x, _ = _batch(100 + t)
        for layer, inp in ((model.body[0], x), (model.body[2], torch.randn(16, 32))):
            E = _topk_mask(layer.weight, layer.nm_n, layer.nm_m)
            with torch.no_grad():
                assert torch.allclose(layer(inp), F.linear(inp, layer.weight * E, layer.bias), atol=1e-6)

    _train(model, opt, sp, 40, check=check)
    assert seen == [([3, 2, 1][min(2, t * 3 // 30)], [31, 16, 8, 7][min(3, t * 4 // 30)]) for t in range(1, 41)]


# ----------------------------------------------------------------------------------------------------
# State, resume, finalize
# ----------------------------------------------------------------------------------------------------
def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical(method):
    model, opt, sp = _make(method, total_steps=30)
    ref_losses = _train(model, opt, sp, 30)
    ref_state, ref_masks, ref_diag = model.state_dict(), {f: m.mask.clone() for f, m in sp.layers.items()}, None
    ref_diag = sp.diagnostics()

    model, opt, sp = _make(method, total_steps=30)
    first = _train(model, opt, sp, 13)
    saved = _save_load({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    model, opt, sp = _make(method, total_steps=30)  # a fresh process: same construction
    if method == "srigl":  # load order does not matter
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sp.load_state_dict(saved["sp"])
    else:
        sp.load_state_dict(saved["sp"])
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    rest = _train(model, opt, sp, 17, start=13)
    assert first + rest == ref_losses
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    for f, m in sp.layers.items():
        assert torch.equal(m.mask, ref_masks[f])
    assert sp.diagnostics() == ref_diag


def test_load_state_dict_errors():
    _, _, sp = _make("rigl")
    _, _, other = _make("rigl", drop_fraction=0.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        sp.load_state_dict(other.state_dict())
    _, _, diag = _make("diagheur")
    with pytest.raises(ValueError, match="not a MaskSparsifier state"):
        sp.load_state_dict(diag.state_dict())
    _, _, small = _make("rigl", filter_fn=lambda m, f: f == "body.0")
    with pytest.raises(ValueError, match="layers differ"):
        sp.load_state_dict(small.state_dict())
    state = sp.state_dict()
    sp.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        sp.load_state_dict(state)
    _, _, fresh = _make("rigl")
    with pytest.raises(ValueError, match="after finalize"):
        fresh.load_state_dict({**state, "finalized": True})


@pytest.mark.parametrize("method", METHODS)
def test_finalize_returns_plain_linears_with_the_final_masks(method):
    model, opt, sp = _make(method)
    _train(model, opt, sp, 40)
    params = {n: p for n, p in model.named_parameters()}
    x, _ = _batch(999)
    with torch.no_grad():
        before = model(x)
    masks = {f: m.mask.clone() for f, m in sp.layers.items()}
    diag = sp.diagnostics()
    out = sp.finalize()
    assert out is model
    for fqn in ("body.0", "body.2"):
        layer = model.get_submodule(fqn)
        assert type(layer) is nn.Linear and layer.weight is params[f"{fqn}.weight"]
        w = layer.weight.detach()
        assert (w[~masks[fqn]] == 0).all()
        assert int((w != 0).sum()) <= diag[fqn]["nnz"]
        state = opt.state[layer.weight]
        assert all((t[~masks[fqn]] == 0).all() for t in state.values() if t.dim() == 2)
        if method.startswith("nm-"):
            m = int(diag[fqn]["nm_m"])
            assert ((w != 0).view(w.shape[0], -1, m).sum(-1) == int(diag[fqn]["nm_n"])).all()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6), "training ended on the final hard masks"
    with pytest.raises(RuntimeError, match="after finalize"):
        sp.step()
    # the finalized model is a plain model: its state dict loads into a fresh dense one
    fresh = tiny_mlp(n_in=16, hidden=32, n_out=5)
    fresh.load_state_dict(model.state_dict())


def test_finalize_mid_decay_applies_the_target_pattern():
    model, opt, sp = _make("nm-structure-decay")
    _train(model, opt, sp, 3)
    assert model.body[2].nm_n == 31
    sp.finalize()
    w = model.body[2].weight.detach()
    assert ((w != 0).view(32, -1, 32).sum(-1) == 7).all()


def test_diagnostics_and_log(caplog):
    import logging

    model, opt, sp = _make("srigl")
    _train(model, opt, sp, 10)
    with caplog.at_level(logging.INFO, logger="diagcompile.dst"):
        d = sp.log()
    assert "body.2" in caplog.text and "density=" in caplog.text
    row = d["body.2"]
    assert row["density"] == row["nnz"] / row["numel"] == 224 / 1024
    assert row["target_density"] == 224 / 1024 and row["updates"] == 2
    assert 224 / 1024 < row["itop"] <= 1
    # weight + bias, and AdamW's exp_avg and exp_avg_sq of each (dense: masks only simulate sparsity) + 2 steps
    assert row["memory_bytes"] == 3 * 4 * (32 * 32 + 32) + 2 * 4
    assert float(sp.regularization_loss()) == 0.0


@pytest.mark.parametrize("method", ["rigl", "nm-srste"])
def test_layers_after_finalize_are_the_plain_linears_in_the_model(method):
    model, opt, sp = _make(method)
    _train(model, opt, sp, 3)
    sp.finalize()
    for fqn, layer in sp.layers.items():
        assert layer is model.get_submodule(fqn) and type(layer) is nn.Linear, fqn


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_an_overflowed_step_skips_the_mask_update(method):
    # GradScaler-skipped steps have inf/NaN gradients: growth would rank them; the update is skipped instead.
    model, optimizer, sp = _make(method)  # updates every 5 steps
    for t in range(4):
        _fwd_bwd(model, t)
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
    masks = {f: m.mask.clone() for f, m in sp.layers.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    x, y = _batch(4)
    scaler.scale(F.mse_loss(model(x), y) * 1e30).backward()  # the scaled loss overflows float32
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    with pytest.warns(UserWarning, match=r"at step 5 the dense gradient is not finite .* for 'body.0', 'body.2'"):
        sp.step()
    assert all(torch.equal(masks[f], m.mask) for f, m in sp.layers.items())
