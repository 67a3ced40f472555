"""Optimizer surgery for Adam/AdamW and SGD with momentum."""

import pytest
import torch
from torch import nn

from diagcompile.dst.optim import (
    add_alpha_group,
    find_group,
    remap_rows_,
    remove_alpha_group,
    remove_param_,
    replace_param_,
    transfer_rows_,
    zero_state_,
)


def _stepped(opt_cls, **kw):
    p = nn.Parameter(torch.randn(5, 3))
    opt = opt_cls([p], lr=0.1, **kw)
    for _ in range(2):
        p.grad = torch.randn(5, 3)
        opt.step()
    return p, opt


OPTIMIZERS = [
    pytest.param(torch.optim.Adam, {}, ["exp_avg", "exp_avg_sq"], id="adam"),
    pytest.param(torch.optim.AdamW, {"amsgrad": True}, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], id="adamw-ams"),
    pytest.param(torch.optim.SGD, {"momentum": 0.9}, ["momentum_buffer"], id="sgd-momentum"),
]


@pytest.mark.parametrize("opt_cls,kw,names", OPTIMIZERS)
def test_remap_rows_moves_values_and_state_and_zeroes_new_rows(opt_cls, kw, names):
    p, opt = _stepped(opt_cls, **kw)
    before_p = p.detach().clone()
    before = {n: opt.state[p][n].clone() for n in names}
    step_before = opt.state[p].get("step")
    step_before = step_before.clone() if isinstance(step_before, torch.Tensor) else step_before
    src = torch.tensor([4, -1, 0, 2, -1])
    remap_rows_(p, src, opt, fill=0.0)
    for i, s in enumerate(src.tolist()):
        if s >= 0:
            assert torch.equal(p[i], before_p[s])
            for n in names:
                assert torch.equal(opt.state[p][n][i], before[n][s]), n
        else:
            assert torch.count_nonzero(p[i]) == 0
            for n in names:
                assert torch.count_nonzero(opt.state[p][n][i]) == 0, n
    if step_before is not None:
        assert torch.equal(torch.as_tensor(opt.state[p]["step"]), torch.as_tensor(step_before))


def test_remap_rows_fill_tensor_and_no_state_and_bad_src():
    p = nn.Parameter(torch.arange(4.0))
    remap_rows_(p, torch.tensor([3, -1, 1, -1]), None, fill=7.5)
    assert p.tolist() == [3.0, 7.5, 1.0, 7.5]
    with pytest.raises(ValueError, match="src"):
        remap_rows_(p, torch.tensor([0, 1]), None)


def test_unsupported_state_shape_raises():
    p = nn.Parameter(torch.randn(4, 2))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["odd"] = torch.zeros(3)
    with pytest.raises(NotImplementedError, match="odd"):
        remap_rows_(p, torch.arange(4), opt)


def test_replace_add_remove_transfer():
    a, b = nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.3}, {"params": [b]}], lr=1e-3)
    new = nn.Parameter(torch.randn(6, 2))
    replace_param_(opt, a, [new])
    assert find_group(opt, new)["weight_decay"] == 0.3 and find_group(opt, a) is None
    with pytest.raises(ValueError, match="not in any param group"):
        replace_param_(opt, a, [new])
    alpha = nn.Parameter(torch.randn(6))
    add_alpha_group(opt, [alpha], lr=0.05)
    g = find_group(opt, alpha)
    assert g["lr"] == 0.05 and g["weight_decay"] == 0.0 and g["betas"] == opt.defaults["betas"]
    add_alpha_group(opt, [], lr=0.05)  # an empty group is allowed (group count independent of the model)
    assert len(opt.param_groups) == 4 and opt.param_groups[-1]["params"] == []
    for p in (new, b, alpha):
        p.grad = torch.randn_like(p)
    opt.step()  # the empty group does not break stepping
    zero_state_(opt, alpha)
    assert torch.count_nonzero(opt.state[alpha]["exp_avg"]) == 0
    compact = nn.Parameter(new.detach()[[1, 4]].clone())
    old_state = {n: t.clone() for n, t in opt.state[new].items()}
    transfer_rows_(opt, new, compact, torch.tensor([1, 4]))
    assert find_group(opt, compact) is not None and new not in opt.state
    assert torch.equal(opt.state[compact]["exp_avg"], old_state["exp_avg"][[1, 4]])
    assert torch.equal(opt.state[compact]["step"], old_state["step"])
    remove_param_(opt, alpha)
    assert find_group(opt, alpha) is None and alpha not in opt.state


def test_remap_rows_moves_a_pending_gradient_with_its_rows():
    # sparsifier.step() before optimizer.step(): the gradient that step will consume must follow the rows
    p = nn.Parameter(torch.arange(12.0).view(4, 3))
    p.grad = torch.arange(100.0, 112.0).view(4, 3)
    g = p.grad.clone()
    remap_rows_(p, torch.tensor([2, -1, 0, 3]), None, fill=0.0)
    assert torch.equal(p.grad, torch.stack([g[2], torch.zeros(3), g[0], g[3]]))


def test_replace_and_remove_change_the_group_list_in_place():
    # LBFGS (and any optimizer like it) keeps its own reference to group["params"]: a new list would leave it
    # stepping the old parameters, so the swap must be visible through every reference to the list.
    a, b, c = (nn.Parameter(torch.randn(4, 2)) for _ in range(3))
    opt = torch.optim.SGD([a, b], lr=0.1)
    held = opt.param_groups[0]["params"]
    new = nn.Parameter(torch.randn(3, 2))
    replace_param_(opt, a, [new])  # at a's place: the order of model.parameters() is kept
    assert opt.param_groups[0]["params"] is held and [id(p) for p in held] == [id(new), id(b)]
    transfer_rows_(opt, new, c, torch.tensor([0, 1]))
    assert opt.param_groups[0]["params"] is held and [id(p) for p in held] == [id(c), id(b)]
    remove_param_(opt, b)
    assert opt.param_groups[0]["params"] is held and [id(p) for p in held] == [id(c)]


def test_named_groups_keep_their_names_in_step_with_their_parameters():
    # torch >= 2.6 optimizers built from named_parameters() carry param_names: add_param_group refused the alpha
    # group without them, and replaced parameters kept their old names at other positions (names then
    # labelled the wrong tensors).
    a, b, c = (nn.Parameter(torch.randn(4, 2)) for _ in range(3))
    opt = torch.optim.AdamW([("a", a), ("b", b), ("c", c)], lr=1e-3)
    values, alpha = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    replace_param_(opt, b, [values], ["b.values"])
    add_alpha_group(opt, [alpha], lr=0.05, names=["b.alpha"])
    assert [g["param_names"] for g in opt.param_groups] == [["a", "b.values", "c"], ["b.alpha"]]
    assert opt.param_groups[0]["params"][1] is values
    compact = nn.Parameter(values.detach()[:2].clone())
    transfer_rows_(opt, values, compact, torch.tensor([0, 1]))  # one for one: the name stays
    remove_param_(opt, alpha)
    remove_param_(opt, a)
    assert [g["param_names"] for g in opt.param_groups] == [["b.values", "c"], []]
    remove_alpha_group(opt)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is compact
    with pytest.raises(ValueError, match="give the names"):
        replace_param_(opt, c, [nn.Parameter(torch.randn(1)), nn.Parameter(torch.randn(1))])


def test_the_emptied_alpha_group_is_removed_behind_groups_added_after_it():
    # A group the user added after the sparsifier (add_param_group) left the alpha group in place: finalize(
    # drop_alpha_group=True) then kept it, and the README's resume recipe failed in load_state_dict ("different
    # number of parameter groups").
    a, extra = nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([a], lr=1e-3)
    alpha = nn.Parameter(torch.randn(4))
    add_alpha_group(opt, [alpha], lr=0.05)
    opt.add_param_group({"params": [extra], "lr": 1e-4})
    remove_param_(opt, alpha)
    remove_alpha_group(opt)
    assert [g["params"] for g in opt.param_groups] == [[a], [extra]]
    fresh = torch.optim.AdamW([a], lr=1e-3)
    fresh.add_param_group({"params": [extra], "lr": 1e-4})
    fresh.load_state_dict(opt.state_dict())
    remove_alpha_group(opt)  # nothing left to remove: a no-op
    assert len(opt.param_groups) == 2
