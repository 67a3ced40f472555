"""sparsify_: in-place swap, equal outputs to the masked dense model, marks, filters, tied weights."""

import copy

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, DiagSparsityConfig, mark_sparse, sparsify_
from diagcompile.passes import pin_marks_
from diagcompile.testing import rel_err


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(48, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


def _masked_dense_copy(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    masked = copy.deepcopy(dense)
    for (_, m), (_, s) in zip(masked.named_modules(), sparse.named_modules()):
        if isinstance(s, DiagLinear):
            with torch.no_grad():
                m.weight.mul_(s.to_dense() != 0)
    return masked


def test_sparsify_equals_the_masked_dense_model():
    dense = Net()
    model = sparsify_(copy.deepcopy(dense), DiagSparsityConfig(sparsity=0.75))
    assert sum(isinstance(m, DiagLinear) for m in model.modules()) == 5
    x = torch.randn(3, 7, 16)
    assert rel_err(model(x), _masked_dense_copy(dense, model)(x)) < 1e-6


def test_filter_fn_marks_and_only_marked():
    dense = Net()
    model = sparsify_(copy.deepcopy(dense), filter_fn=lambda m, fqn: fqn.endswith("fc1"))
    assert isinstance(model.blocks[0].fc1, DiagLinear) and isinstance(model.blocks[0].fc2, nn.Linear)

    model = copy.deepcopy(dense)
    mark_sparse(model.head, offsets=[0, 5])
    mark_sparse(model.blocks[1].fc2, sparsity=0.5)
    sparsify_(model, DiagSparsityConfig(only_marked=True))
    assert model.head.offsets.tolist() == [0, 5]
    assert model.blocks[1].fc2.k == 24 and isinstance(model.blocks[0].fc1, nn.Linear)


@pytest.mark.parametrize("selection", ["even", "random"])
def test_other_selections(selection):
    model = sparsify_(nn.Sequential(nn.Linear(32, 64)), DiagSparsityConfig(sparsity=0.5, selection=selection))
    assert model[0].k == 32
    if selection == "even":
        assert model[0].offsets.tolist() == list(range(0, 64, 2))


def test_subclass_top_level_linear_is_returned():
    class Sub(nn.Linear):
        pass

    new = sparsify_(Sub(8, 8), DiagSparsityConfig(sparsity=0.5))
    assert isinstance(new, DiagLinear) and new.k == 4


def test_one_module_registered_twice_is_replaced_everywhere_not_refused_as_tied():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module, called twice: not two tied layers
    x = torch.randn(3, 16)
    sparsify_(model, DiagSparsityConfig(sparsity=0.75))
    assert isinstance(model[0], DiagLinear) and model[2] is model[0]  # still shared
    W, b = model[0].to_dense().detach(), model[0].bias.detach()
    torch.testing.assert_close(model(x), torch.relu(x @ W.T + b) @ W.T + b)
    # A filter_fn that keeps one of its places dense cannot be met by one module: refused whichever place it
    # rejects (named_modules lists the module under its first place only), model unchanged.
    for rejected in ("0", "2"):
        model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(16, 16))
        with pytest.raises(ValueError, match=rf"registered as \['0', '2'\].*but not at \['{rejected}'\]"):
            sparsify_(model, DiagSparsityConfig(sparsity=0.75), filter_fn=lambda m, fqn, r=rejected: fqn != r)
        assert model[0] is lin and model[2] is lin and type(model[3]) is nn.Linear


def test_tied_weights_are_rejected_clearly():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        sparsify_(model)


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify_(torch.randn(3))
    with pytest.raises(TypeError, match="Conv2d"):
        sparsify_(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="layer 'blocks.0.fc1'"):
        sparsify_(Net(), DiagSparsityConfig(sparsity=0.999))
    with pytest.raises(ValueError, match="sparsity"):
        DiagSparsityConfig(sparsity=1.0)
    with pytest.raises(TypeError, match="DiagSparsityConfig"):
        sparsify_(Net(), {"sparsity": 0.9})
    with pytest.warns(UserWarning, match="no nn.Linear"):
        sparsify_(nn.Sequential(nn.ReLU(), nn.Tanh()))


def test_numpy_sparsity_is_a_plain_float():
    import numpy as np

    cfg = DiagSparsityConfig(sparsity=np.float32(0.5))
    assert type(cfg.sparsity) is float and cfg.sparsity == 0.5
    assert sparsify_(nn.Sequential(nn.Linear(16, 16)), cfg)[0].k == 8


def test_a_parametrized_linear_is_converted_from_its_weight_with_a_warning():
    dense = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    nn.utils.parametrizations.weight_norm(dense[0])
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
        ref[0].weight.copy_(dense[0].weight), ref[0].bias.copy_(dense[0].bias)
        ref[1].load_state_dict(dense[1].state_dict())
    with pytest.warns(UserWarning, match=r"dropping the parametrization: '0' \(weight: _WeightNorm\)"):
        sparsify_(dense, DiagSparsityConfig(sparsity=0.0))
    assert isinstance(dense[0], DiagLinear)
    torch.testing.assert_close(dense(x), ref(x))


class _Doubled(nn.Linear):
    """A subclass whose forward does more than the linear map: replacing it would drop the factor 2."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_linears_a_swap_would_break_stay_dense_with_a_warning():
    # nn.MultiheadAttention reads out_proj.weight itself (a DiagLinear has none); _Doubled's forward would be lost.
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(layer, _Doubled(16, 16))
    x = torch.randn(2, 3, 16)
    with pytest.warns(UserWarning, match=r"'0.self_attn.out_proj' \(nn.MultiheadAttention.*'1' \(_Doubled overrides"):
        sparsify_(model, DiagSparsityConfig(sparsity=0.5))
    assert isinstance(layer.linear1, DiagLinear) and isinstance(layer.linear2, DiagLinear)
    assert type(layer.self_attn.out_proj) is not DiagLinear and type(model[1]) is _Doubled
    assert model(x).shape == (2, 3, 16)  # runs: attention still finds its out_proj.weight


def test_transformer_encoder_in_eval_mode_runs_its_regular_path():
    # In eval mode torch's fused encoder path reads linear1.weight / linear2.weight as dense matrices (and the
    # encoder's nested-tensor path does, given a padding mask): the swap turns it off for these modules only.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    dense = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    model = sparsify_(copy.deepcopy(dense), DiagSparsityConfig(sparsity=0.5))
    reference = _masked_dense_copy(dense, model)
    x = torch.randn(3, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pad}):
            out, ref = model(x, **kwargs), reference(x, **kwargs)
            assert out.shape == ref.shape
            keep = ~pad  # torch's nested path (the dense reference's) writes zeros at padded positions
            torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is left alone


def test_a_marked_linear_that_cannot_be_swapped_is_refused():
    model = nn.Sequential(_Doubled(8, 8), nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.5)
    with pytest.raises(ValueError, match=r"sparse-marked.*'0' \(_Doubled overrides forward"):
        sparsify_(model, DiagSparsityConfig(only_marked=True))
    assert type(model[0]) is _Doubled and type(model[1]) is nn.Linear  # checked before anything changed


def test_frozen_weight_and_trainable_bias_keep_their_flags():
    for weight_grad, bias_grad in ((False, True), (True, False)):
        model = nn.Sequential(nn.Linear(8, 8))
        model[0].weight.requires_grad_(weight_grad)
        model[0].bias.requires_grad_(bias_grad)
        sparsify_(model, DiagSparsityConfig(sparsity=0.5))
        assert (model[0].values.requires_grad, model[0].bias.requires_grad) == (weight_grad, bias_grad)


def test_hooks_move_to_the_new_layer_and_their_handles_still_remove_them():
    # A hook on a swapped linear (activation capture, a scale, a LoRA-style add-on) must keep running, and the
    # handle the user holds from before the swap must still remove it.
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model = copy.deepcopy(base)
    seen: list[str] = []
    handles = [
        model[0].register_forward_pre_hook(lambda m, args, kwargs: ((2 * args[0],), kwargs), with_kwargs=True),
        model[0].register_forward_hook(lambda m, args, out: out + 1, always_call=True),
        model[0].register_full_backward_pre_hook(lambda m, grad_out: seen.append("pre " + type(m).__name__)),
        model[0].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(type(m).__name__)),
    ]
    sparsify_(model, DiagSparsityConfig(sparsity=0.5))
    plain = _masked_dense_copy(base, model)  # hook-free reference on the same diagonals
    x = torch.randn(3, 16, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, plain[2](plain[1](plain[0](2 * x) + 1)))
    out.sum().backward()
    assert seen == ["pre DiagLinear", "DiagLinear"]
    for h in handles:
        h.remove()
    torch.testing.assert_close(model(x), plain(x))
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks and not model[0]._backward_hooks


def test_a_failing_layer_leaves_the_whole_model_unchanged():
    # The last layer (P = 8) cannot reach 90%: the error comes before any layer is swapped.
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(8, 4))
    before = list(model.children())
    with pytest.raises(ValueError, match="layer '4'"):
        sparsify_(model, DiagSparsityConfig(sparsity=0.9))
    assert list(model.children()) == before and all(type(m) is not DiagLinear for m in model.modules())


def test_new_layers_keep_the_train_or_eval_mode_of_the_linear_they_replace():
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 16))).eval()
    model[1].train()  # a submodule in another mode than its parent keeps it
    sparsify_(model, DiagSparsityConfig(sparsity=0.5))
    assert (model.training, model[0].training, model[1][0].training) == (False, False, True)


def test_sparsify_warns_about_a_pin_that_differs_and_pin_marks_keeps_it():
    # The diagcompile backend pins its top-k choice on the *weight's* mark (the module keeps the top-k mark)
    # and trains those diagonals. sparsify_ follows the module's mark (a pin made before new weights were
    # loaded is stale) but says so; pin_marks_ first keeps the trained diagonals.
    def trained():
        model = nn.Sequential(nn.Linear(16, 16))
        mark_sparse(model[0], sparsity=0.75)
        with torch.no_grad():
            model[0].weight.add_(10 * torch.eye(16))  # top-k by norm would now keep diagonal 0
        mark_sparse(model[0].weight, offsets=[3, 5, 9, 12])  # what the backend's pinning does
        return model

    model = trained()
    with pytest.warns(UserWarning, match=r"'0': its weight carries diagonals pinned .*pin_marks_\(model\)"):
        sparsify_(model, DiagSparsityConfig(only_marked=True))
    assert 0 in model[0].offsets.tolist()
    model = trained()
    pin_marks_(model)
    sparsify_(model, DiagSparsityConfig(only_marked=True))
    assert model[0].offsets.tolist() == [3, 5, 9, 12]


def test_hooks_that_recompute_the_dense_weight_are_dropped_with_a_warning():
    # torch.nn.utils.prune's pre-hook reads weight_orig / weight_mask, which a DiagLinear lacks: carried
    # over, it made the converted model fail at its first forward.
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.3)
    model[0].register_forward_pre_hook(lambda m, args: None)  # a user's hook is still carried over
    with pytest.warns(UserWarning, match="dropped L1Unstructured from the replaced linear"):
        sparsify_(model, DiagSparsityConfig(sparsity=0.5))
    assert [type(h).__name__ for h in model[0]._forward_pre_hooks.values()] == ["function"]
    assert model(torch.randn(4, 32)).shape == (4, 16)


def test_an_uninitialized_lazy_linear_is_refused_with_what_to_do():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"sparsify_: \['0'\]: an uninitialized nn.LazyLinear.*run one forward"):
        sparsify_(model)
    with pytest.raises(ValueError, match="mark_sparse: an uninitialized nn.LazyLinear"):
        mark_sparse(model[0], sparsity=0.5)
    model(torch.randn(2, 5))  # materialized: now an ordinary linear
    sparsify_(model, DiagSparsityConfig(sparsity=0.5))
    assert isinstance(model[0], DiagLinear) and model[0].in_features == 5
