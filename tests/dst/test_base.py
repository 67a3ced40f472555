"""The checks DiagSparsifier and MaskSparsifier share (diagcompile/dst/_base.py), run against both."""

import warnings

import pytest
import torch
from torch import nn

from diagcompile import mark_sparse
from diagcompile.dst import DiagSparsifier, DSTConfig, MaskConfig, MaskSparsifier
from diagcompile.testing import not_head, tiny_mlp, train_toy

SPARSIFIERS = [
    pytest.param(DiagSparsifier, DSTConfig, MaskConfig, id="diag"),
    pytest.param(MaskSparsifier, MaskConfig, DSTConfig, id="mask"),
]


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_bad_arguments_are_refused_before_anything_changes(sparsifier, config_cls, other_config_cls):
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=f"already has state: construct {sparsifier.__name__} before"):
        sparsifier(model, opt, config_cls(total_steps=10))
    with pytest.raises(ValueError, match="single nn.Linear"):
        sparsifier(nn.Linear(4, 4), None, config_cls(total_steps=10))
    with pytest.raises(TypeError, match=f"config must be a {config_cls.__name__}"):
        sparsifier(tiny_mlp(), None, other_config_cls(total_steps=10))
    with pytest.raises(TypeError, match=config_cls.__name__):
        sparsifier(tiny_mlp(), None, {"total_steps": 10})
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        sparsifier(tied, None, config_cls(total_steps=10))
    assert all(type(m) is nn.Linear for m in (*model.modules(), *tied.modules()) if isinstance(m, nn.Linear))


def _tiny_run(sparsifier, config_cls):
    """A tiny MLP, AdamW and a sparsifier for 4 steps (updates every 2), head dense."""
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = sparsifier(model, opt, config_cls(total_steps=4, sparsity=0.5, update_every=2), filter_fn=not_head)
    return model, opt, sp


def _past_end(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "beyond total_steps" in str(w.message)]


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_stepping_past_total_steps_warns_once(sparsifier, config_cls, other_config_cls):
    model, opt, sp = _tiny_run(sparsifier, config_cls)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train_toy(model, opt, sp, 4)  # exactly total_steps: a normal run, no warning
    assert not _past_end(rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train_toy(model, opt, sp, 3, start=4)  # steps 5, 6, 7: past the end
    past = _past_end(rec)
    assert len(past) == 1, [str(w.message) for w in rec]
    msg = str(past[0].message)
    assert f"{sparsifier.__name__}.step() called for step 5, beyond total_steps=4" in msg, msg
    assert "the schedule is over" in msg and "topology" in msg and "temperature" in msg, msg
    assert past[0].filename == train_toy.__code__.co_filename  # points at the caller of step()
    assert sp.step_count == 7


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_optimizers_that_cannot_follow_a_topology_update_are_refused(sparsifier, config_cls, other_config_cls):
    # LBFGS keeps one flat curvature history (and one param group); Rprop's fresh per-weight step size is lr,
    # not 0, so a regrown diagonal / connection, whose state is zeroed, would never move. Refused up front.
    for opt_cls, why in (
        (torch.optim.LBFGS, "LBFGS: LBFGS keeps one flat curvature history.*one param group"),
        (torch.optim.Rprop, "Rprop: its fresh per-weight state is not zero.*could not start fresh"),
    ):
        model = tiny_mlp()
        with pytest.raises(ValueError, match=f"{sparsifier.__name__} cannot train with torch.optim.{why}"):
            sparsifier(model, opt_cls(model.parameters()), config_cls(total_steps=10, update_every=2), not_head)
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear)), "changed"


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_sharded_models_and_zero_redundancy_optimizer_are_refused_by_name(
    gloo_group, sparsifier, config_cls, other_config_cls
):
    # FSDP2 (fully_shard) and FSDP1 failed inside a DTensor op ("got mixed torch.Tensor and DTensor") or with a
    # message about weight_norm; ZeroRedundancyOptimizer was accepted, and then its local optimizer kept stepping
    # the replaced dense weights (the values never trained) or the regrown connections' stale state. All are now
    # refused before anything changes, and a model sharded after the sparsifier at the first step().
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    name = sparsifier.__name__
    config = config_cls(total_steps=10, update_every=2)
    sharded = tiny_mlp()
    fully_shard(sharded)
    wrapped = FullyShardedDataParallel(tiny_mlp(), device_id=torch.device("cpu"), use_orig_params=True)
    for model, what in ((sharded, "sharded by fully_shard"), (wrapped, "a FullyShardedDataParallel wrapper")):
        with pytest.raises(ValueError, match=rf"^{name} cannot train a sharded model: '<model>' is {what}.*Distrib"):
            sparsifier(model, torch.optim.AdamW(model.parameters()), config, not_head)
    model = tiny_mlp()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match=rf"^{name} cannot train with ZeroRedundancyOptimizer: .*local optimizer"):
        sparsifier(model, zero, config, not_head)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear)), "changed before the error"
    # built on the bare model, sharded afterwards: refused at the first step()
    model = tiny_mlp()
    sp = sparsifier(model, torch.optim.AdamW(model.parameters()), config, not_head)
    fully_shard(model)
    with pytest.raises(ValueError, match=rf"^{name} cannot train a sharded model"):
        sp.step()


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_errors_name_the_sparsifier_and_what_it_does(sparsifier, config_cls, other_config_cls):
    name = sparsifier.__name__
    does = "swap the dense weights for their diagonals" if sparsifier is DiagSparsifier else "mask the weights"
    model = tiny_mlp(n_in=16, hidden=16, n_out=16)
    model.head.weight = model.body[0].weight  # tied weights, both 16 x 16
    with pytest.raises(ValueError, match=rf"^{name}: the weight of 'body.0' is shared with \['head.weight'\]") as e:
        sparsifier(model, None, config_cls(total_steps=10, sparsity=0.5))
    assert ("Diag" if sparsifier is MaskSparsifier else "mask") not in str(e.value), e.value
    model = tiny_mlp()
    with pytest.raises(ValueError, match=f"Adagrad creates its state in its constructor.*{name} cannot") as e:
        sparsifier(model, torch.optim.Adagrad(model.parameters()), config_cls(total_steps=10, sparsity=0.5))
    if sparsifier is MaskSparsifier:
        assert "diagonal" not in str(e.value), e.value
    else:
        assert does in str(e.value), e.value


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_lazy_and_parametrized_linears_are_refused_with_the_fix(sparsifier, config_cls, other_config_cls):
    from torch.nn.utils.parametrizations import weight_norm

    cfg = config_cls(total_steps=10, sparsity=0.5, update_every=2)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"'0' is an uninitialized nn.LazyLinear.*run one forward pass"):
        sparsifier(model, torch.optim.Adam(model.parameters()), cfg)
    model(torch.randn(2, 8))  # materialized: now a plain nn.Linear, converted like any other
    sparsifier(model, torch.optim.Adam(model.parameters()), cfg)

    model = nn.Sequential(weight_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"'0' is parametrized.*remove_parametrizations\(m, \"weight\"\).*filter_fn"):
        sparsifier(model, torch.optim.Adam(model.parameters()), cfg)
    # excluded by filter_fn: the rest converts
    sparsifier(model, torch.optim.Adam(model.parameters()), cfg, filter_fn=lambda m, fqn: fqn != "0")


class _TwoAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)  # self_attn inside
        self.cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)  # separate q/k/v weights
        self.head = nn.Linear(16, 4)

    def forward(self, x, mem):
        h = self.enc(x)
        return self.head(h + self.cross(h, mem, mem)[0])


def _attention_warnings(record):
    return [str(w.message) for w in record if "nn.MultiheadAttention" in str(w.message)]


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_multihead_attention_left_dense_is_said_once(sparsifier, config_cls, other_config_cls):
    # its projections (fused in_proj_weight, out_proj read by attribute) were skipped without a word
    cfg = config_cls(total_steps=10, sparsity=0.5, update_every=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sp = sparsifier(_TwoAttentions(), None, cfg)
    said = _attention_warnings(rec)
    assert len(said) == 1, said
    assert "8 attention projections (query, key, value, output) of 2 nn.MultiheadAttention" in said[0]
    assert "'enc.self_attn', 'cross'" in said[0] and "in_proj_weight" in said[0] and "filter_fn" in said[0]
    assert [w.filename for w in rec if "nn.MultiheadAttention" in str(w.message)] == [__file__]  # the caller
    assert set(sp.layers) == {"enc.linear1", "enc.linear2", "head"}
    # quiet when there is none, or when filter_fn or marks leave attention out anyway
    for model, kw in [
        (tiny_mlp(), {}),
        (_TwoAttentions(), {"filter_fn": lambda m, fqn: "attn" not in fqn and "cross" not in fqn}),
    ]:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            sparsifier(model, None, cfg, **kw)
        assert not _attention_warnings(rec), _attention_warnings(rec)
    marked = _TwoAttentions()
    mark_sparse(marked.head, sparsity=0.5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert set(sparsifier(marked, None, cfg).layers) == {"head"}
    assert not _attention_warnings(rec), _attention_warnings(rec)


def _rewrap(record):
    return [w for w in record if "DistributedDataParallel" in str(w.message)]


@pytest.mark.parametrize(
    "method, swaps",
    [("dynadiag", True), ("dynadiag-pool", True), ("diagheur", False), ("rigl", True), ("nm-srste", True)],
)
def test_finalize_under_torch_distributed_warns_to_rewrap_ddp(gloo_group, method, swaps):
    from diagcompile.dst import make_sparsifier

    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = {"pool": 2.0} if method == "dynadiag-pool" else {}
    sp = make_sparsifier(model, opt, method.removesuffix("-pool"), 0.5, 4, not_head, update_every=2, **options)
    ddp = nn.parallel.DistributedDataParallel(model)
    train_toy(ddp, opt, sp, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sp.finalize()
    rewrap = _rewrap(rec)
    if not swaps:  # diagheur's layers stay the same DiagLinear objects: the old wrapper is still right
        assert not rewrap, [str(w.message) for w in rec]
        return
    assert len(rewrap) == 1, [str(w.message) for w in rec]
    msg = str(rewrap[0].message)
    assert f"{type(sp).__name__}.finalize() replaced" in msg and "DDP(ddp.module" in msg, msg
    assert rewrap[0].filename == __file__, rewrap[0].filename  # points at the caller of finalize()
    # the advice works: a fresh wrapper around the finalized module fine-tunes
    ddp = nn.parallel.DistributedDataParallel(ddp.module)
    x, y = torch.randn(8, 16), torch.randn(8, 5)
    for _ in range(2):
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_finalize_without_torch_distributed_does_not_talk_about_ddp(sparsifier, config_cls, other_config_cls):
    model, opt, sp = _tiny_run(sparsifier, config_cls)
    train_toy(model, opt, sp, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sp.finalize()
    assert not _rewrap(rec), [str(w.message) for w in rec]


@pytest.mark.parametrize("method", ["dynadiag", "diagheur", "rigl"])
def test_user_hooks_survive_conversion_and_finalize(method):
    """The layers a sparsifier swaps in (at construction, and compact ones at finalize) keep the user's hooks."""
    from diagcompile.dst import make_sparsifier

    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    calls = []
    model.body[2].register_forward_hook(lambda m, i, out: calls.append(type(m).__name__) or out * 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = make_sparsifier(model, opt, method, 0.5, 4, not_head, update_every=2)
    train_toy(model, opt, sp, 4)
    assert calls, "the hook was lost when the sparsifier converted the layer"
    final = sp.finalize()
    calls.clear()
    out = final(torch.randn(3, 16))
    assert len(calls) == 1, calls  # the user's hook, once (the sparsifier's probe hooks are gone)
    # the hook zeroes body[2]'s output: what follows sees relu(0) = 0, so the output is the head's bias
    torch.testing.assert_close(out, final.head.bias.expand(3, -1))
