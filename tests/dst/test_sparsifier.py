"""DiagSparsifier: conversion and optimizer rewiring, topology updates, freeze, state, finalize."""

import io
import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, mark_sparse
from diagcompile.dst import DiagSparsifier, DSTConfig, DynaDiagLinear, memory_report
from diagcompile.dst.config import DYNADIAG_ONLY
from diagcompile.dst.optim import find_group
from diagcompile.dst.relax import threshold_tau
from diagcompile.functional import canonical_offsets
from diagcompile.ops import extract_diagonals, k_from_sparsity
from diagcompile.testing import dense_from_convention, deterministic_algorithms, not_head, tiny_mlp
from diagcompile.testing import toy_batch as _batch
from diagcompile.testing import train_toy as _train

MODES = {
    "diagheur": {"method": "diagheur"},
    "dynadiag": {"method": "dynadiag"},
    "dynadiag-pool": {"method": "dynadiag", "pool": 2.0},
    "softmax-clamp": {"method": "dynadiag", "relaxation": "softmax_clamp"},
    "dynadiag-rms": {"method": "dynadiag", "soft_scale": "rms"},
}


def _make(opt="adamw", seed=0, **cfg):
    torch.manual_seed(seed)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"total_steps": 40, "sparsity": 0.8, "update_every": 5, "alpha_lr": 0.05, **cfg}
    if cfg.get("method") == "diagheur":  # tests parametrized over modes pass dynadiag's knobs, which it refuses
        cfg = {k: v for k, v in cfg.items() if k not in DYNADIAG_ONLY}
    sp = DiagSparsifier(model, optimizer, DSTConfig(**cfg), filter_fn=not_head)
    return model, optimizer, sp


def _topology(sp):
    out = {}
    for fqn, m in sp.layers.items():
        out[fqn] = (m.offsets if isinstance(m, DiagLinear) else m.kept_offsets()).clone()
    return out


# ----------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_conversion_rewires_the_optimizer(mode):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    biases = {n: m.bias for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    sp = DiagSparsifier(model, opt, DSTConfig(total_steps=10, sparsity=0.8, **MODES[mode]), filter_fn=not_head)
    expected_cls = DiagLinear if MODES[mode]["method"] == "diagheur" else DynaDiagLinear
    assert set(sp.layers) == {"body.0", "body.2"} and isinstance(model.head, nn.Linear)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for fqn, layer in sp.layers.items():
        assert isinstance(layer, expected_cls)
        assert id(weights[fqn]) not in in_opt, "the dense weight must leave the optimizer"
        assert find_group(opt, layer.values)["weight_decay"] == 0.1, "values join the weight's group"
        assert layer.bias is biases[fqn] and find_group(opt, layer.bias)["weight_decay"] == 0.0
        k = k_from_sparsity(layer.out_features, layer.in_features, 0.8)
        assert (layer.k if isinstance(layer, DiagLinear) else layer.k) == k
    if expected_cls is DynaDiagLinear:
        g = find_group(opt, model.body[0].alpha)
        assert g is find_group(opt, model.body[2].alpha) and g["lr"] == 0.01 and g["weight_decay"] == 0.0
    assert len(opt.param_groups) == (3 if expected_cls is DynaDiagLinear else 2)


@pytest.mark.parametrize("soft_scale", ["none", "rms"])
def test_rms_soft_scale_keeps_a_trained_model_s_function_at_conversion(soft_scale):
    # Sparsifying a trained dense model: with soft_scale="rms" the faithful layers start as the dense layers
    # they replace (so DST fine-tunes from the trained function); the paper's layers start sqrt(k/P) smaller.
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    x = torch.randn(8, 16)
    with torch.no_grad():
        dense = model(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = DSTConfig(total_steps=10, sparsity=0.8, alpha_init_noise=0.0, soft_scale=soft_scale)
    sp = DiagSparsifier(model, opt, cfg, filter_fn=not_head)
    with torch.no_grad():
        same = torch.allclose(model(x), dense, atol=1e-5, rtol=1e-5)
    assert same == (soft_scale == "rms")
    P, k = 32, sp.layers["body.2"].k
    assert sp.diagnostics()["body.2"]["soft_gain"] == (pytest.approx(math.sqrt(P / k)) if same else 1.0)


def test_conversion_errors_and_selection():
    # (the checks both sparsifiers share are in tests/dst/test_base.py)
    bad = tiny_mlp(n_in=256, hidden=8, n_out=4)  # body.0 (P=256) can reach 99%, body.2 (8x8) cannot
    with pytest.raises(ValueError, match="layer 'body.2'.*0.99"):
        DiagSparsifier(bad, None, DSTConfig(total_steps=10, sparsity=0.99))
    assert all(type(m) is nn.Linear for m in (bad.body[0], bad.body[2], bad.head)), "nothing converted on error"
    # a weight outside the optimizer
    m = tiny_mlp()
    with pytest.raises(ValueError, match="not in any param group"):
        DiagSparsifier(m, torch.optim.SGD(m.head.parameters(), lr=0.1), DSTConfig(total_steps=10))


def test_marked_linears_win_and_mha_projections_are_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.b(self.a(self.attn(x, x, x)[0])))

    net = Net()
    with pytest.warns(
        UserWarning, match=r"4 attention projections .* of 1 nn.MultiheadAttention module\(s\) stay dense"
    ):
        assert DiagSparsifier(net, None, DSTConfig(total_steps=5, sparsity=0.5)).layers.keys() == {"a", "b", "c"}
    net = Net()
    mark_sparse(net.b, sparsity=0.75)
    mark_sparse(net.c, offsets=[1, 6])
    sp = DiagSparsifier(net, None, DSTConfig(total_steps=5, method="diagheur"))
    assert set(sp.layers) == {"b", "c"} and isinstance(net.a, nn.Linear)
    assert net.b.k == k_from_sparsity(8, 16, 0.75) and net.c.offsets.tolist() == [1, 6]
    net(torch.randn(3, 2, 8))  # the attention block still works


@pytest.mark.parametrize("method", ["dynadiag", "diagheur"])
def test_a_transformer_encoder_evaluates_during_dst_and_after_finalize(method):
    # Eval mode sends nn.TransformerEncoderLayer down torch's fused path, which reads linear1.weight itself.
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    sp = DiagSparsifier(enc, opt, DSTConfig(total_steps=6, sparsity=0.5, method=method, update_every=2))
    assert len(sp.layers) == 4
    x = torch.randn(3, 5, 16)
    for _ in range(6):
        enc.train()
        enc(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sp.step()
        with torch.no_grad():
            enc.eval()
            before = enc(x)
    sp.finalize()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dynadiag", "diagheur"])
def test_a_linear_subclass_with_its_own_forward_is_left_dense_or_refused_if_marked(method):
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    net = nn.Sequential(nn.Linear(8, 8), Doubled(8, 8))
    with pytest.warns(UserWarning, match=r"left dense: '1' \(Doubled overrides forward"):
        sp = DiagSparsifier(net, None, DSTConfig(total_steps=5, sparsity=0.5, method=method))
    assert set(sp.layers) == {"0"} and type(net[1]) is Doubled
    net = nn.Sequential(nn.Linear(8, 8), Doubled(8, 8))
    mark_sparse(net[1], sparsity=0.5)
    with pytest.raises(ValueError, match="sparse-marked linear '1' cannot be converted"):
        DiagSparsifier(net, None, DSTConfig(total_steps=5, sparsity=0.5, method=method))
    assert type(net[0]) is nn.Linear  # refused before anything changed


def test_rescaled_init_copies_the_dense_diagonals():
    torch.manual_seed(0)
    model = tiny_mlp()
    w = model.body[0].weight.detach().clone()
    sp = DiagSparsifier(model, None, DSTConfig(total_steps=5, method="diagheur", sparsity=0.75))
    layer = sp.layers["body.0"]
    assert torch.allclose(layer.values, extract_diagonals(w, layer.offsets) * math.sqrt(32 / layer.k))


# ----------------------------------------------------------------------------------------------------
# Topology updates
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_k_constant_offsets_valid_and_shapes_fixed_after_every_step(mode):
    model, opt, sp = _make(**MODES[mode])
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def check(t):
        assert {n: p.shape for n, p in model.named_parameters()} == shapes
        for layer in sp.layers.values():
            kept = layer.offsets if isinstance(layer, DiagLinear) else layer.kept_offsets()
            assert kept.numel() == layer.k
            canonical_offsets(kept, layer.out_features, layer.in_features)  # raises if unsorted/dup/out of range
            if isinstance(layer, DynaDiagLinear):
                canonical_offsets(layer.candidate_offsets, layer.out_features, layer.in_features)

    _train(model, opt, sp, 40, check=check)
    d = sp.diagnostics()
    if MODES[mode]["method"] == "diagheur" or "pool" in MODES[mode]:  # the modes with topology updates
        assert all(v["updates"] > 0 for v in d.values()), "no topology update happened"
    assert all(v["offsets_changed_total"] > 0 for v in d.values()), "the topology never changed"


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_diagheur_grows_by_the_batch_gradient_with_zero_values_and_state(opt_kind):
    model, opt, sp = _make(opt=opt_kind, method="diagheur", update_every=3, drop_fraction=0.5)
    _train(model, opt, sp, 2)
    layer = sp.layers["body.2"]
    # The dense weight gradient on the step-3 batch, computed independently of the probe hooks.
    x, y = _batch(2)
    dense = nn.Linear(32, 32)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    nn.functional.mse_loss(model.head(model.body[3](dense(model.body[:2](x)))), y).backward()
    scores = extract_diagonals(dense.weight.grad, torch.arange(32)).norm(dim=1)
    opt.zero_grad()
    old_offsets = layer.offsets.tolist()
    _train(model, opt, sp, 1, start=2)  # step 3: forward, backward, optimizer.step(), the update
    new_offsets = layer.offsets.tolist()
    grown = set(new_offsets) - set(old_offsets)
    assert 0 < len(grown) <= sp._updates.count_at(3, layer.k)
    # every grown offset beats every candidate left outside, by the batch's dense gradient
    outside = [p for p in range(32) if p not in set(new_offsets)]
    assert min(scores[list(grown)]) >= max(scores[outside]) - 1e-6
    state = opt.state[layer.values]
    names = [n for n, t in state.items() if t.dim() == 2]
    assert names, "no per-element optimizer state"
    for i, off in enumerate(new_offsets):
        if off in grown:
            assert torch.count_nonzero(layer.values[i]) == 0
            for name in names:
                assert torch.count_nonzero(state[name][i]) == 0, name


def test_diagheur_state_rows_follow_their_diagonal_exactly():
    model, opt, sp = _make(method="diagheur", update_every=3, drop_fraction=0.5)
    _train(model, opt, sp, 2)
    x, y = _batch(2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    layer = sp.layers["body.0"]
    before = {
        int(o): (layer.values[i].detach().clone(), opt.state[layer.values]["exp_avg"][i].clone())
        for i, o in enumerate(layer.offsets)
    }
    sp.step()  # the update, right after the optimizer step: nothing else moves the rows
    opt.zero_grad()
    assert sp.diagnostics()["body.0"]["offsets_changed"] > 0
    for i, o in enumerate(layer.offsets.tolist()):
        if o in before:
            assert torch.equal(layer.values[i], before[o][0])
            assert torch.equal(opt.state[layer.values]["exp_avg"][i], before[o][1])
        else:
            assert torch.count_nonzero(layer.values[i]) == 0
            assert torch.count_nonzero(opt.state[layer.values]["exp_avg"][i]) == 0
            assert torch.count_nonzero(opt.state[layer.values]["exp_avg_sq"][i]) == 0


def test_pool_refresh_newcomers_start_at_the_boundary_with_zero_state():
    model, opt, sp = _make(method="dynadiag", pool=2.0, update_every=3, drop_fraction=0.6)
    _train(model, opt, sp, 2)
    x, y = _batch(2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    layer = sp.layers["body.2"]
    top_before = set(layer.kept_offsets().tolist())
    tau = threshold_tau(layer.alpha, layer.k, float(layer.temperature))
    old = {int(o): i for i, o in enumerate(layer.candidate_offsets)}
    old_alpha = layer.alpha.detach().clone()
    sp.step()
    opt.zero_grad()
    cand = layer.candidate_offsets.tolist()
    assert len(cand) == len(set(cand)) == layer.num_candidates
    assert top_before <= set(cand), "the current top-k never leaves the pool"
    new = [i for i, o in enumerate(cand) if o not in old]
    assert new, "no newcomer"
    for i in new:
        assert torch.count_nonzero(layer.values[i]) == 0
        assert layer.alpha[i].item() == pytest.approx(tau, abs=1e-6)
        for name in ("exp_avg", "exp_avg_sq"):
            assert opt.state[layer.values][name][i].abs().sum() == 0
            assert opt.state[layer.alpha][name][i] == 0
    for i, o in enumerate(cand):
        if o in old:
            assert layer.alpha[i] == old_alpha[old[o]]


@pytest.mark.parametrize("mode", ["diagheur", "dynadiag-pool"])
def test_probe_based_updates_run_under_bfloat16_autocast(mode):
    model, opt, sp = _make(**MODES[mode])
    for t in range(11):  # two updates (update_every=5)
        x, y = _batch(t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert all(d["updates"] == 2 for d in sp.diagnostics().values())


def test_probes_are_captured_only_on_update_steps_and_accumulate():
    model, opt, sp = _make(method="diagheur", update_every=4)
    rec = sp._layers[0]
    for t in range(3):
        x, y = _batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        assert rec.probe is None, "probe captured on a step without an update"
        opt.step()
        sp.step()
        opt.zero_grad()
    # step 4 updates: two micro-batches (gradient accumulation) sum into the probe
    x, y = _batch(3, n=32)
    nn.functional.mse_loss(model(x[:16]), y[:16]).div(2).backward()
    first = rec.probe.clone()
    nn.functional.mse_loss(model(x[16:]), y[16:]).div(2).backward()
    with torch.no_grad():
        model(x)  # no-grad forwards do not capture
    assert not torch.equal(first, rec.probe)
    layer = sp.layers["body.0"]
    ref = nn.Linear(16, 32)
    with torch.no_grad():
        ref.weight.copy_(layer.to_dense())
        ref.bias.copy_(layer.bias)
    nn.functional.mse_loss(model.head(model.body[1:](ref(x))), y).backward()
    full = extract_diagonals(ref.weight.grad, torch.arange(32))
    assert torch.allclose(rec.probe, full, atol=1e-6)


def test_missing_probe_warns_and_skips():
    model, opt, sp = _make(method="diagheur", update_every=1)
    before = sp.layers["body.0"].offsets.clone()
    with pytest.warns(UserWarning, match="no probe gradient"):
        sp.step()
    assert torch.equal(sp.layers["body.0"].offsets, before)


# ----------------------------------------------------------------------------------------------------
# Temperature and freeze
# ----------------------------------------------------------------------------------------------------
def test_temperature_follows_the_schedule_per_step():
    model, opt, sp = _make(temperature_start=2.0, temperature_end=0.1, freeze_at=20, temperature_schedule="linear")
    seen = []
    _train(model, opt, sp, 19, check=lambda t: seen.append(float(sp.layers["body.0"].temperature)))
    # linear from T_start at step 0 to T_end at step 19, the last soft step before the freeze at 20
    assert seen == pytest.approx([2.0 + (0.1 - 2.0) * t / 19 for t in range(1, 20)])
    assert seen[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("soft_scale", ["none", "rms"])
@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_freeze_is_continuous_and_then_alpha_stays_put(opt_kind, soft_scale):
    # SGD moves alpha by lr * grad (Adam by ~lr): it needs a larger alpha_lr for the same separation.
    model, opt, sp = _make(
        opt=opt_kind,
        freeze_at=25,
        temperature_end=1e-4,
        alpha_lr=0.05 if opt_kind == "adamw" else 1.0,
        soft_scale=soft_scale,
    )
    _train(model, opt, sp, 24)
    x, y = _batch(24)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    probe = torch.randn(64, 16)
    with torch.no_grad():
        before = model(probe)
    assert all(d["mass_outside_topk"] < 1e-6 for d in sp.diagnostics().values())
    sp.step()  # step 25: the freeze
    opt.zero_grad()
    with torch.no_grad():
        after = model(probe)
    assert all(layer.frozen for layer in sp.layers.values())
    assert torch.equal(after, before), f"max jump {float((after - before).abs().max())}"
    alphas = [layer.alpha.detach().clone() for layer in sp.layers.values()]
    values = [layer.values.detach().clone() for layer in sp.layers.values()]
    _train(model, opt, sp, 10, start=25)
    for a, layer in zip(alphas, sp.layers.values()):
        assert torch.equal(layer.alpha, a), "alpha moved after the freeze"
    assert any(not torch.equal(v, layer.values) for v, layer in zip(values, sp.layers.values()))
    d = sp.diagnostics()
    assert all(v["frozen"] == 1 and v["k_eff"] == v["k"] == v["sum_alpha_tilde"] for v in d.values())


def test_paper_mode_freeze_jumps_and_fold_does_not():
    # softmax_clamp at a low temperature has collapsed (sum alpha~ << k): the paper's hardening (alpha~ := 1
    # on the top-k, V unchanged) changes the function a lot; folding alpha~ into V keeps it.
    jumps = {}
    for fold in (True, False):
        model, opt, sp = _make(relaxation="softmax_clamp", freeze_at=30, temperature_end=0.01, fold_at_freeze=fold)
        _train(model, opt, sp, 29)
        x, y = _batch(29)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert max(d["sum_alpha_tilde"] / d["k"] for d in sp.diagnostics().values()) < 0.9  # collapsed
        probe = torch.randn(64, 16)
        with torch.no_grad():
            before = model(probe)
        sp.step()  # the freeze
        with torch.no_grad():
            jumps[fold] = float((model(probe) - before).norm() / before.norm())
    assert jumps[False] > 10 * jumps[True] and jumps[False] > 0.05, jumps


def test_freeze_at_zero_is_a_static_topk():
    torch.manual_seed(0)
    dense = {
        n: m.weight.detach().clone()
        for n, m in tiny_mlp(n_in=16, hidden=32, n_out=5).named_modules()
        if isinstance(m, nn.Linear)
    }
    model, opt, sp = _make(freeze_at=0)
    assert all(layer.frozen for layer in sp.layers.values())
    for fqn, layer in sp.layers.items():
        # Values as initialised (the dense diagonals times sqrt(P/k)), not folded with the initial alpha~ ~ k/P.
        P = max(layer.in_features, layer.out_features)
        want = extract_diagonals(dense[fqn], layer.kept_offsets()) * math.sqrt(P / layer.k)
        assert torch.allclose(layer.to_diag_linear().values, want), fqn
    top = _topology(sp)
    _train(model, opt, sp, 10)
    assert all(torch.equal(top[f], o) for f, o in _topology(sp).items())


def test_regularization_loss():
    model, opt, sp = _make(alpha_l1=0.5, freeze_at=3)
    expected = 0.5 * sum(layer.alpha.abs().sum() for layer in sp.layers.values())
    assert torch.allclose(sp.regularization_loss(), expected)
    sp.regularization_loss().backward()
    assert sp.layers["body.0"].alpha.grad is not None
    opt.zero_grad()
    _train(model, opt, sp, 3)
    assert sp.regularization_loss().item() == 0.0  # frozen: the term is gone
    _, _, off = _make()
    assert off.regularization_loss().item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Diagnostics, state, finalize
# ----------------------------------------------------------------------------------------------------
def test_diagnostics_and_log(caplog):
    model, opt, sp = _make(freeze_at=20)
    _train(model, opt, sp, 5)
    d = sp.diagnostics()
    keys = {
        "k",
        "k_eff",
        "k_half",
        "sum_alpha_tilde",
        "mass_outside_topk",
        "temperature",
        "soft_gain",
        "offsets_changed",
        "offsets_changed_total",
        "frozen",
        "memory_bytes",
        "candidates",
        "updates",
        "P",
    }
    assert set(d) == {"body.0", "body.2"} and all(set(v) == keys for v in d.values())
    assert all(isinstance(x, float) for v in d.values() for x in v.values())
    assert d["body.0"]["sum_alpha_tilde"] == pytest.approx(d["body.0"]["k"], rel=1e-5)
    assert d["body.0"]["memory_bytes"] == memory_report(model, opt)["body.0"]["total"]
    with caplog.at_level(logging.INFO, logger="diagcompile.dst"):
        sp.log()
    assert sum("k_eff=" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_weights_only(mode):
    model, opt, sp = _make(**MODES[mode])
    _train(model, opt, sp, 13)
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    _, _, fresh = _make(seed=1, **MODES[mode])
    fresh.load_state_dict(state)
    assert fresh.step_count == 13
    a, b = sp.state_dict(), fresh.state_dict()
    assert a["config"] == b["config"] and a["step"] == b["step"]
    for fqn in a["layers"]:
        for key, v in a["layers"][fqn].items():
            assert torch.equal(v, b["layers"][fqn][key]) if isinstance(v, torch.Tensor) else v == b["layers"][fqn][key]


def test_load_state_dict_rejects_a_different_run():
    _, _, sp = _make()
    _, _, other = _make(sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        other.load_state_dict(sp.state_dict())
    bad = sp.state_dict()
    bad["layers"].pop("body.0")
    with pytest.raises(ValueError, match="layers differ"):
        sp.load_state_dict(bad)


@pytest.mark.parametrize("split", [17, 23], ids=["before-freeze", "after-freeze"])
@pytest.mark.parametrize("mode", MODES)
def test_resume_is_bit_identical(mode, split):
    cfg = {**MODES[mode], "freeze_at": 20}
    model, opt, sp = _make(**cfg)
    losses = _train(model, opt, sp, 30)
    reference = {n: t.clone() for n, t in model.state_dict().items()}

    model, opt, sp = _make(**cfg)
    first = _train(model, opt, sp, split)  # 17: after a topology update, before the freeze; 23: after it
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "dst": sp.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model, opt, sp = _make(seed=123, **cfg)  # a different init: everything must come from the checkpoint
    sp.load_state_dict(ckpt["dst"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    second = _train(model, opt, sp, 30 - split, start=split)
    assert first + second == losses
    for n, t in model.state_dict().items():
        assert torch.equal(t, reference[n]), n


@pytest.mark.parametrize("mode", MODES)
def test_finalize_gives_compact_diaglinears_with_the_same_outputs(mode):
    model, opt, sp = _make(**MODES[mode], freeze_at=12)
    _train(model, opt, sp, 15)
    x = torch.randn(8, 16)
    with torch.no_grad():
        before = model(x)
    out = sp.finalize()
    assert out is model
    for fqn in ("body.0", "body.2"):
        layer = model.get_submodule(fqn)
        assert type(layer) is DiagLinear
        assert layer.values.shape == (layer.k, 32 if fqn == "body.2" else 16)
        canonical_offsets(layer.offsets, layer.out_features, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6, rtol=1e-5)
    # the optimizer follows: it can keep training the compact model
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.parameters())
    x, y = _batch(99)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="finalize"):
        sp.step()


@pytest.mark.parametrize("mode", ["dynadiag", "dynadiag-pool"])
def test_finalize_before_the_freeze_warns_with_the_mass_it_drops(mode):
    model, opt, sp = _make(**MODES[mode], total_steps=400)  # total_steps counted micro-batches, say
    _train(model, opt, sp, 6)
    share = max(d["mass_outside_topk"] / d["sum_alpha_tilde"] for d in sp.diagnostics().values())
    assert share > 0.01
    with pytest.warns(
        UserWarning, match=rf"after 6 step\(\) call\(s\), before DynaDiag's freeze.*{100 * share:.1f}%"
    ) as w:
        sp.finalize()
    assert w[0].filename == __file__  # points at the caller of finalize()
    # At the freeze nothing is dropped and nothing is said.
    model, opt, sp = _make(**MODES[mode], freeze_at=5)
    _train(model, opt, sp, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.finalize()


def test_pool_holds_less_memory_than_faithful():
    reports = {}
    for name, pool in (("faithful", None), ("pool", 2.0)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256))
        opt = torch.optim.AdamW(model.parameters())
        DiagSparsifier(model, opt, DSTConfig(total_steps=5, sparsity=0.9, pool=pool))
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        reports[name] = memory_report(model, opt)["0"]
    k, P, D = k_from_sparsity(256, 256, 0.9), 256, 256
    C = math.ceil(2.0 * k)
    # values + alpha + bias, each with AdamW's two moments (+ a scalar step per parameter)
    assert reports["faithful"]["params"] == 4 * (P * D + P + 256)
    assert reports["pool"]["params"] == 4 * (C * D + C + 256)
    assert reports["pool"]["optimizer_state"] == 2 * reports["pool"]["params"] + 3 * 4
    assert reports["pool"]["total"] < 0.25 * reports["faithful"]["total"]


# ----------------------------------------------------------------------------------------------------
# DiagHeur end to end against an independent dense-masked implementation
# ----------------------------------------------------------------------------------------------------
def _diagonal_mask(offsets, n_out, n_in):
    return dense_from_convention(torch.ones(len(offsets), min(n_out, n_in)), offsets, n_out, n_in).bool()


def test_diagheur_matches_a_dense_masked_rigl_reference():
    """RigL on whole diagonals written densely (masked weights, plain AdamW, masks and Adam moments edited by
    hand) must follow the same loss curve and topology as DiagSparsifier's compact diagonal implementation."""
    steps, every, frac = 30, 5, 0.5
    model, opt, sp = _make(method="diagheur", update_every=every, drop_fraction=frac, total_steps=steps)
    names = ["body.0", "body.2"]
    # the reference starts from the sparsifier's initial state
    ref_w, ref_b, offsets, masks = {}, {}, {}, {}
    for n in names:
        layer = sp.layers[n]
        ref_w[n] = nn.Parameter(layer.to_dense().detach().clone())
        ref_b[n] = nn.Parameter(layer.bias.detach().clone())
        offsets[n] = layer.offsets.tolist()
        masks[n] = _diagonal_mask(offsets[n], layer.out_features, layer.in_features)
    head_w = nn.Parameter(model.head.weight.detach().clone())
    head_b = nn.Parameter(model.head.bias.detach().clone())
    ref_opt = torch.optim.AdamW([*ref_w.values(), *ref_b.values(), head_w, head_b], lr=1e-2, weight_decay=0.1)

    losses, ref_losses = [], []
    for t in range(steps):
        losses += _train(model, opt, sp, 1, start=t)  # the two runs advance in lockstep
        x, y = _batch(t)
        eff = {}
        h = x
        for n in names:
            eff[n] = ref_w[n] * masks[n]
            eff[n].retain_grad()
            h = torch.relu(nn.functional.linear(h, eff[n], ref_b[n]))
        loss = nn.functional.mse_loss(nn.functional.linear(h, head_w, head_b), y)
        loss.backward()
        ref_opt.step()
        step = t + 1
        if step % every == 0 and step < int(round(0.75 * steps)):
            f = frac / 2 * (1 + math.cos(math.pi * step / round(0.75 * steps)))
            for n in names:
                W = ref_w[n]
                n_out, n_in = W.shape
                P, k = max(n_out, n_in), len(offsets[n])
                drop = math.floor(f * k)
                if drop == 0:
                    continue
                norms = {p: float(W.detach()[_diagonal_mask([p], n_out, n_in)].norm()) for p in offsets[n]}
                scores = {p: float(eff[n].grad[_diagonal_mask([p], n_out, n_in)].norm()) for p in range(P)}
                kept = sorted(offsets[n], key=lambda p: (norms[p], p))[drop:]  # weakest first; ties: lower
                grow = sorted((p for p in range(P) if p not in kept), key=lambda p: (-scores[p], p))[:drop]
                new = sorted(kept + grow)
                fresh = _diagonal_mask([p for p in new if p not in offsets[n]], n_out, n_in)
                gone = _diagonal_mask([p for p in offsets[n] if p not in new], n_out, n_in)
                with torch.no_grad():
                    W[fresh | gone] = 0.0
                    for key in ("exp_avg", "exp_avg_sq"):
                        ref_opt.state[W][key][fresh | gone] = 0.0
                offsets[n], masks[n] = new, _diagonal_mask(new, n_out, n_in)
        ref_opt.zero_grad()
        ref_losses.append(loss.item())
        for n in names:
            assert sp.layers[n].offsets.tolist() == offsets[n], f"step {step}, {n}: topology differs"
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert sp.diagnostics()["body.0"]["offsets_changed_total"] > 0
    for n in names:
        assert torch.allclose(sp.layers[n].to_dense(), ref_w[n] * masks[n], atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Misuse: frozen layers, marks dynadiag cannot honour, schedulers, call order, pickling
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_frozen_linear_stays_frozen(mode):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    model.body[0].weight.requires_grad_(False)  # a frozen (e.g. pretrained) weight; its bias still trains
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = DiagSparsifier(model, opt, DSTConfig(total_steps=8, sparsity=0.5, update_every=2, **MODES[mode]), not_head)
    frozen, trained = sp.layers["body.0"], sp.layers["body.2"]
    assert not frozen.values.requires_grad and frozen.bias.requires_grad
    assert trained.values.requires_grad
    if isinstance(frozen, DynaDiagLinear):
        assert not frozen.alpha.requires_grad and trained.alpha.requires_grad
    before = {n: p.detach().clone() for n, p in frozen.named_parameters() if n != "bias"}
    x = torch.randn(4, 16)

    def weight_part():  # the layer's function without its bias (which trains)
        with torch.no_grad():
            return frozen(x) - frozen.bias

    y0 = weight_part()
    _train(model, opt, sp, 6)  # through the dynadiag freeze (step 4) and several topology updates
    assert all(torch.equal(before[n], p) for n, p in frozen.named_parameters() if n != "bias")
    torch.testing.assert_close(weight_part(), y0, rtol=1e-6, atol=1e-6, msg="the frozen layer's function changed")
    assert sp.diagnostics()["body.0"]["offsets_changed_total"] == 0
    model = sp.finalize()
    assert not model.body[0].values.requires_grad and model.body[2].values.requires_grad


@pytest.mark.parametrize("extra", [{}, {"freeze_at": 0}, {"pool": 2.0}])
def test_dynadiag_refuses_a_mark_with_explicit_offsets(extra):
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    mark_sparse(model.body[2], offsets=[1, 5, 9, 13])
    with pytest.raises(ValueError, match=r"'body.2'.*explicit offsets.*method='diagheur'"):
        DiagSparsifier(model, None, DSTConfig(total_steps=10, method="dynadiag", **extra))
    assert all(type(m) is nn.Linear for m in (model.body[0], model.body[2], model.head)), "nothing converted"


def test_construction_validates_every_layer_before_changing_the_model():
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.SGD([*model.body[0].parameters(), *model.head.parameters()], lr=0.1)  # body.2 left out
    w0 = model.body[0].weight
    with pytest.raises(ValueError, match="'body.2'.*not in any param group"):
        DiagSparsifier(model, opt, DSTConfig(total_steps=10, sparsity=0.5), not_head)
    assert type(model.body[0]) is nn.Linear and model.body[0].weight is w0, "body.0 was converted before the error"
    assert any(p is w0 for g in opt.param_groups for p in g["params"]), "the optimizer was rewired before the error"


@pytest.mark.parametrize("mode", ["diagheur", "dynadiag-pool"])
def test_a_model_under_dst_pickles_and_its_copy_is_inert(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))  # (tiny_mlp's class is local)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = DiagSparsifier(model, opt, DSTConfig(total_steps=10, sparsity=0.75, update_every=2, **MODES[mode]))
    _train(model, opt, sp, 1)  # the next step is an update step: the probe hooks are armed
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    x, y = _batch(1)
    nn.functional.mse_loss(copy(x), y).backward()
    assert all(rec.probe is None for rec in sp._layers), "the copy fed the original's probes"
    _train(model, opt, sp, 1, start=1)  # the original still trains, with its probes
    assert all(d["updates"] == 1 for d in sp.diagnostics().values())


def test_a_schedule_without_any_update_warns_where_updates_matter():
    with pytest.warns(UserWarning, match=r"before step 8 \(update_end=0.75 of total_steps=10\): no update happens"):
        _make(method="diagheur", total_steps=10, update_every=50)
    # dynadiag's pool refreshes end at its freeze (it has no update_end: its config refuses one)
    with pytest.warns(UserWarning, match=r"before step 5 \(freeze_at=0.5 of total_steps=10\): no update happens"):
        _make(method="dynadiag", pool=2.0, total_steps=10, update_every=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _make(method="dynadiag", total_steps=10, update_every=50)  # faithful: every candidate is held, no updates


def test_optimizers_whose_state_cannot_follow_the_diagonals_are_refused_early():
    # Adafactor keeps factored (row/column) state: refused at the first step, not at finalize() after a whole run.
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    sp = DiagSparsifier(model, opt, DSTConfig(total_steps=20, sparsity=0.5), filter_fn=not_head)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(NotImplementedError, match="Adafactor keeps optimizer state 'row_var'.*shaped like the param"):
        sp.step()
    # Adagrad makes its state in its constructor: not "stepped already", a clear refusal.
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    with pytest.raises(ValueError, match="Adagrad creates its state in its constructor"):
        DiagSparsifier(model, torch.optim.Adagrad(model.parameters()), DSTConfig(total_steps=20, sparsity=0.5))


def test_a_scheduler_created_before_the_sparsifier_is_refused():
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="scheduler.*after"):
        DiagSparsifier(model, opt, DSTConfig(total_steps=10, sparsity=0.5), not_head)
    assert type(model.body[0]) is nn.Linear and len(opt.param_groups) == 1, "changed before the error"
    # diagheur adds no param group, so a scheduler made before it keeps working
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    sp = DiagSparsifier(model, opt, DSTConfig(total_steps=10, method="diagheur", sparsity=0.5), not_head)
    _train(model, opt, sp, 2)
    sched.step()


def test_sparsifier_step_before_optimizer_step_leaves_grown_diagonals_at_zero():
    # The documented order is optimizer.step() then sparsifier.step(); the other order must not hand a grown
    # diagonal the gradient of the diagonal that used to sit in its row.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = DSTConfig(total_steps=20, method="diagheur", sparsity=0.75, update_every=1, drop_fraction=1.0)
    sp = DiagSparsifier(model, opt, cfg)
    layer = model[0]
    model(torch.randn(8, 16)).pow(2).sum().backward()
    old = layer.offsets.clone()
    g_old = dict(zip(old.tolist(), layer.values.grad.clone()))
    sp.step()
    grown = ~torch.isin(layer.offsets, old)
    assert grown.any()
    for off, g in zip(layer.offsets.tolist(), layer.values.grad):
        assert torch.equal(g, g_old[off]) if off in g_old else torch.count_nonzero(g) == 0
    opt.step()
    assert torch.count_nonzero(layer.values[grown]) == 0


def test_optimizer_none_while_training_warns_once():
    cfg = DSTConfig(total_steps=20, method="diagheur", sparsity=0.75, update_every=1)
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    sp = DiagSparsifier(model, None, cfg, not_head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="optimizer=None") as rec:
        _train(model, opt, sp, 3)
    assert sum("optimizer=None" in str(w.message) for w in rec) == 1
    # inference-only use (no gradients) stays quiet
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    sp = DiagSparsifier(model, None, cfg, not_head)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.no_grad():
                model(torch.randn(2, 16))
            sp.step()
    assert not any("optimizer=None" in str(w.message) for w in rec)


@pytest.mark.parametrize("mode", MODES)
def test_a_frozen_linear_left_out_of_the_optimizer_is_converted_and_stays_out(mode, caplog):
    # The usual way to freeze a layer: requires_grad_(False), optimizer over the trainable parameters only. The
    # layer is converted like a frozen layer the optimizer holds (the docstring's frozen-linear support), and the
    # optimizer keeps not seeing it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    model[2].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = DSTConfig(total_steps=8, sparsity=0.5, update_every=2, **MODES[mode])
    with caplog.at_level(logging.INFO, logger="diagcompile.dst"):
        sp = DiagSparsifier(model, opt, cfg)
    assert any("'2'" in m and "frozen" in m and "not in the optimizer" in m for m in caplog.messages), caplog.messages
    frozen = sp.layers["2"]
    assert not frozen.values.requires_grad and find_group(opt, frozen.values) is None
    if isinstance(frozen, DynaDiagLinear):
        assert frozen.frozen and find_group(opt, frozen.alpha) is None
    assert all(find_group(opt, sp.layers[f].values) is not None for f in ("0", "4"))
    x = torch.randn(4, 32)
    with torch.no_grad():
        y0 = frozen(x) - frozen.bias
    losses = _train(model, opt, sp, 8)  # through the topology updates and the dynadiag freeze
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x) - frozen.bias, y0, rtol=1e-6, atol=1e-6)
    assert sp.diagnostics()["2"]["offsets_changed_total"] == 0
    model = sp.finalize()
    assert all(isinstance(model[i], DiagLinear) for i in (0, 2, 4))
    assert not model[2].values.requires_grad and find_group(opt, model[2].values) is None
    assert find_group(opt, model[0].values) is not None
    with torch.no_grad():
        torch.testing.assert_close(model[2](x) - model[2].bias, y0, rtol=1e-6, atol=1e-6)
    _train(model, opt, _NoSparsifier(), 2, start=8)  # fine-tuning the compact model still works


def test_a_trainable_linear_left_out_of_the_optimizer_is_still_refused():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([model[0].bias], lr=1e-2)  # the trainable model[2].weight is missing
    with pytest.raises(ValueError, match=r"the weight of '2' is not in any param group of the optimizer"):
        DiagSparsifier(model, opt, DSTConfig(total_steps=8, sparsity=0.5))
    assert all(type(m) is nn.Linear for m in (model[0], model[2])), "changed before the error"


class _NoSparsifier:
    """``train_toy``'s sparsifier after ``finalize()``: nothing to add or step."""

    def regularization_loss(self):
        return torch.zeros(())

    def step(self):
        pass


def test_load_state_dict_names_a_mask_sparsifier_state_and_loads_states_without_a_kind():
    from diagcompile.dst import make_sparsifier

    model, opt, sp = _make()
    _train(model, opt, sp, 3)
    state = sp.state_dict()
    assert state["kind"] == "diag"
    masked = tiny_mlp(n_in=16, hidden=32, n_out=5)
    rigl = make_sparsifier(masked, torch.optim.AdamW(masked.parameters()), "rigl", 0.8, 40, not_head, update_every=5)
    with pytest.raises(ValueError, match=r"^not a DiagSparsifier state \(it is a MaskSparsifier state\)$"):
        sp.load_state_dict(rigl.state_dict())
    with pytest.raises(ValueError, match=r"^not a MaskSparsifier state \(it is a DiagSparsifier state\)$"):
        rigl.load_state_dict(state)
    # a state saved before the "kind" key existed is a DiagSparsifier state: it still loads
    old = {k: v for k, v in state.items() if k != "kind"}
    _, _, fresh = _make()
    fresh.load_state_dict(old)
    assert fresh.step_count == 3


def test_finalize_after_the_freeze_logs_no_second_freeze(caplog):
    model, opt, sp = _make(freeze_at=4, total_steps=8)
    with caplog.at_level(logging.INFO, logger="diagcompile.dst"):
        _train(model, opt, sp, 6)
        sp.finalize()
    freezes = [m for m in caplog.messages if "dynadiag freeze" in m]
    assert freezes == ["step 4: dynadiag freeze: 2 layers now train values only"], freezes
    # finalize() before the freeze does freeze (and says so)
    model, opt, sp = _make(freeze_at=4, total_steps=8)
    _train(model, opt, sp, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diagcompile.dst"), pytest.warns(UserWarning, match="still soft"):
        sp.finalize()
    freezes = [m for m in caplog.messages if "dynadiag freeze" in m]
    assert freezes == ["step 3: dynadiag freeze: 2 layers now train values only"], freezes


def _freeze_warnings(record):
    return [w for w in record if "the freeze at step" in str(w.message)]


def test_a_scheduled_freeze_that_drops_much_alpha_mass_warns_once():
    # A constant temperature of 1 never hardens alpha~: the freeze's hard top-k drops most of it.
    model, opt, sp = _make(temperature_schedule="constant", temperature_start=1.0, freeze_at=4, total_steps=8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _train(model, opt, sp, 8)  # step 4: the freeze
    warned = _freeze_warnings(rec)
    assert len(warned) == 1, [str(w.message) for w in rec]
    msg = str(warned[0].message)
    worst = re.search(r"^DiagSparsifier: the freeze at step 4 drops up to ([\d.]+)% of a layer's alpha~ mass", msg)
    assert worst and float(worst.group(1)) > 50, msg
    assert "'body.0'" in msg and "'body.2'" in msg and "temperature" in msg, msg
    assert warned[0].filename == _train.__code__.co_filename  # points at the caller of step()


@pytest.mark.parametrize("mode", [m for m in MODES if m != "diagheur"])
def test_a_scheduled_freeze_of_hardened_layers_says_nothing(mode):
    model, opt, sp = _make(**MODES[mode])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _train(model, opt, sp, 40)  # through the freeze at step 20
    assert not _freeze_warnings(rec), [str(w.message) for w in rec]


@pytest.mark.parametrize("mode", ["diagheur", "dynadiag-pool"])
def test_an_overflowed_step_skips_the_topology_update(mode):
    """Mixed precision: GradScaler skips the optimizer step whose gradients overflowed. An update due then
    ranked candidates by NaN scores and wrote duplicate offsets; it is now skipped with a warning, and the
    next update works."""
    model, optimizer, sp = _make(**MODES[mode])  # updates every 5 steps
    _train(model, optimizer, sp, 4)
    before = _topology(sp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    x, y = _batch(4)
    scaler.scale(nn.functional.mse_loss(model(x), y) * 1e30).backward()  # the scaled loss overflows float32
    scaler.step(optimizer)  # skipped: the gradients are inf
    scaler.update()
    optimizer.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.step()
    overflow = [w for w in caught if "not finite" in str(w.message)]
    # one warning for the step, naming every layer skipped, pointing at the caller of step()
    assert len(overflow) == 1 and overflow[0].filename == __file__
    assert re.search(r"at step 5 the probe gradient .* for 'body.0', 'body.2'", str(overflow[0].message))
    after = _topology(sp)
    assert all(torch.equal(before[f], after[f]) for f in before)
    _train(model, optimizer, sp, 5, start=5)  # the update at step 10 happens, with distinct offsets
    final = _topology(sp)
    assert any(not torch.equal(before[f], final[f]) for f in before)
    for m in sp.layers.values():
        offsets = m.offsets if isinstance(m, DiagLinear) else m.candidate_offsets
        assert offsets.unique().numel() == offsets.numel()


@pytest.mark.parametrize("mode", ["diagheur", "dynadiag", "dynadiag-pool"])
@pytest.mark.parametrize("named", [False, True], ids=["params", "named"])
def test_the_optimizer_keeps_the_model_s_layout_and_names(mode, named):
    """The values take the weight's place in its group, and a finalized model's optimizer is laid out like
    one built afresh over it: its state_dict loads into that one (fine-tuning resumed in a new process; it
    failed with a shape mismatch). Optimizers built from named_parameters() work, with the right names."""
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    optimizer = torch.optim.AdamW(model.named_parameters() if named else model.parameters(), lr=1e-2)
    cfg = {"total_steps": 10, "sparsity": 0.8, "update_every": 5, **MODES[mode]}
    sp = DiagSparsifier(model, optimizer, DSTConfig(**cfg), filter_fn=not_head)

    def check_names():
        if named:
            by_id = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                assert group["param_names"] == [by_id[id(p)] for p in group["params"]]

    check_names()
    assert optimizer.param_groups[0]["params"] == [p for n, p in model.named_parameters() if not n.endswith("alpha")]
    _train(model, optimizer, sp, 10)
    sp.finalize(drop_alpha_group=True)
    check_names()
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())
    fresh = torch.optim.AdamW(model.named_parameters() if named else model.parameters(), lr=1e-2)
    fresh.load_state_dict(optimizer.state_dict())
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    fresh.step()


def test_lr_schedulers_made_after_the_sparsifier_keep_stepping_after_finalize():
    # finalize() once removed the emptied alpha group: schedulers that zip one value per group strictly
    # (LambdaLR, CyclicLR, ReduceLROnPlateau with per-group min_lr) then failed (review). It stays by default.
    model, optimizer, sp = _make(**MODES["dynadiag"])
    n = len(optimizer.param_groups)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        torch.optim.lr_scheduler.CyclicLR(optimizer, [1e-3] * n, [1e-2] * n, cycle_momentum=False),
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, min_lr=[0.0] * n),
    ]
    _train(model, optimizer, sp, 3)
    sp.finalize()
    assert len(optimizer.param_groups) == n and optimizer.param_groups[-1]["params"] == []
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    for scheduler in schedulers:
        scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()


def test_a_state_of_the_earlier_optimizer_layout_is_refused():
    # Version 1 states went with optimizer states whose values were appended to their group: refused by name.
    model, optimizer, sp = _make(**MODES["diagheur"])
    state = {**sp.state_dict(), "version": 1}
    _, _, fresh = _make(**MODES["diagheur"])
    with pytest.raises(ValueError, match=r"state version 1.*wrong parameters"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["dynadiag", "dynadiag-pool", "diagheur"])
def test_training_under_deterministic_mode_runs_and_repeats_its_bits(mode, threads):
    # Topology updates, the freeze and finalize() under torch.use_deterministic_algorithms(True): no op refuses,
    # and a second identical run ends with the same bits.
    def run() -> dict[str, torch.Tensor]:
        model, optimizer, sp = _make(total_steps=12, update_every=3, **MODES[mode])
        _train(model, optimizer, sp, 12)
        return sp.finalize().state_dict()

    with deterministic_algorithms(threads):
        first, second = run(), run()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
