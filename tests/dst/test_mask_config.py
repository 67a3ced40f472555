"""MaskConfig: defaults from the baselines digest, validation, (de)serialization."""

import math
import re

import numpy as np
import pytest

from diagcompile.dst import MaskConfig


def test_defaults_are_the_papers():
    c = MaskConfig(total_steps=1000)
    assert (c.method, c.update_every, c.drop_fraction, c.update_end) == ("rigl", 100, 0.3, 0.75)
    assert c.gamma_sal == 0.3 and c.ablation and c.srste_lambda == 2e-4
    assert c.update_end_step == 750
    assert c.decay_c == pytest.approx(10 / 750)
    assert math.exp(-c.decay_c * 750) < 1e-4
    decay = MaskConfig(total_steps=1000, method="nm-mask-decay", mask_decay_shape="linear")
    assert decay.decay_c == pytest.approx(1 / 750)
    assert MaskConfig(total_steps=1000, method="nm-mask-decay", mask_decay_c=1e-4).decay_c == 1e-4
    assert not c.is_nm and MaskConfig(total_steps=5, method="nm-srste").is_nm


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 1.5}, TypeError, "total_steps"),
        ({"method": "set"}, ValueError, "method"),
        ({"method": "dynadiag"}, ValueError, "method"),
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"update_every": 0}, ValueError, "update_every"),
        ({"drop_fraction": 1.5}, ValueError, "drop_fraction"),
        ({"update_end": -0.1}, ValueError, "update_end"),
        ({"distribution": "er"}, ValueError, "distribution"),
        ({"budget": "ceil"}, ValueError, "budget"),
        ({"rescale_init": 1}, TypeError, "rescale_init"),
        ({"seed": 1.0}, TypeError, "seed"),
        ({"gamma_sal": -1.0}, ValueError, "gamma_sal"),
        ({"no_ablation": "head"}, TypeError, "no_ablation"),
        ({"no_ablation": (1,)}, TypeError, "no_ablation"),
        ({"nm_m": 1}, ValueError, "nm_m"),
        ({"nm_n": 2}, ValueError, "needs nm_m"),
        ({"nm_n": 5, "nm_m": 4}, ValueError, "nm_n"),
        ({"nm_max_m": 1}, ValueError, "nm_max_m"),
        ({"srste_lambda": -1e-4}, ValueError, "srste_lambda"),
        ({"mask_decay_shape": "cosine"}, ValueError, "mask_decay_shape"),
        ({"mask_decay_c": 0.0}, ValueError, "mask_decay_c"),
        ({"mask_decay_grad": "none"}, ValueError, "mask_decay_grad"),
        ({"method": "nm-srste", "distribution": "erk"}, ValueError, "uniform"),
    ],
)
def test_validation(kwargs, exc, match):
    kwargs = {"total_steps": 10, **kwargs}
    with pytest.raises(exc, match=match):
        MaskConfig(**kwargs)


def test_an_explicit_nm_refuses_a_different_sparsity():
    # nm_n:nm_m fixes every layer's density at N / M: a sparsity of 0.9 next to 2:4 was recorded (metrics,
    # tables) while the layers trained at 0.5
    with pytest.raises(
        ValueError, match=r"sparsity=0\.9 contradicts nm_n=2, nm_m=4.*1 - 2/4 = 0\.5: pass sparsity=0\.5"
    ):
        MaskConfig(total_steps=10, method="nm-srste", sparsity=0.9, nm_n=2, nm_m=4)
    assert MaskConfig(total_steps=10, method="nm-srste", sparsity=0.5, nm_n=2, nm_m=4).sparsity == 0.5
    assert MaskConfig(total_steps=10, method="nm-mask-decay", sparsity=1 - 1 / 3, nm_n=1, nm_m=3).nm_m == 3
    # nm_m alone leaves N to the sparsity
    assert MaskConfig(total_steps=10, method="nm-srste", sparsity=0.9, nm_m=4).nm_n is None


def test_round_trip_and_list_names():
    c = MaskConfig(total_steps=10, method="srigl", no_ablation=["body.0"], seed=3)
    assert c.no_ablation == ("body.0",)
    assert MaskConfig.from_dict(c.to_dict()) == c
    d = c.to_dict()
    d["no_ablation"] = list(d["no_ablation"])  # e.g. after JSON
    assert MaskConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown fields"):
        MaskConfig.from_dict({**c.to_dict(), "pool": 2.0})


def test_numpy_scalars_are_accepted_and_stored_as_plain_python():
    c = MaskConfig(
        total_steps=np.int64(100),
        method="nm-mask-decay",
        sparsity=np.float32(0.5),
        seed=np.uint8(3),
        nm_m=np.int32(4),
        nm_n=np.int64(2),
        nm_max_m=np.int16(8),
        mask_decay_c=np.float64(0.01),
    )
    d = c.to_dict()
    for name in ("total_steps", "seed", "nm_m", "nm_n", "nm_max_m"):
        assert type(d[name]) is int, name
    for name in ("sparsity", "mask_decay_c"):
        assert type(d[name]) is float, name
    assert MaskConfig.from_dict(d) == c and c.nm_m == 4 and c.seed == 3
    # fields of the other methods (each refused outside its own: see below)
    assert type(MaskConfig(total_steps=10, method="srigl", gamma_sal=np.float64(0.95)).gamma_sal) is float
    assert type(MaskConfig(total_steps=10, method="nm-srste", srste_lambda=np.float32(1e-4)).srste_lambda) is float
    for bad in ("4", np.float64(4.0), np.bool_(True), np.array([4])):
        with pytest.raises(TypeError, match=r"MaskConfig.nm_m=.* must be an int or None"):
            MaskConfig(total_steps=10, nm_m=bad)


@pytest.mark.parametrize(
    "method, field, value, used_by",
    [
        ("rigl", "nm_m", 4, ("nm-srste", "nm-mask-decay", "nm-structure-decay")),
        ("rigl", "srste_lambda", 0.1, ("nm-srste",)),
        ("rigl", "mask_decay_c", 5.0, ("nm-mask-decay",)),
        ("rigl", "ablation", False, ("srigl",)),
        ("nm-srste", "mask_decay_shape", "linear", ("nm-mask-decay",)),
        ("nm-mask-decay", "gamma_sal", 0.9, ("srigl",)),
        ("nm-structure-decay", "rescale_init", False, ("rigl", "srigl")),
        ("srigl", "nm_max_m", 8, ("nm-srste", "nm-mask-decay", "nm-structure-decay")),
        ("nm-srste", "erk_power", 2.0, ("rigl", "srigl")),
        ("rigl", "no_ablation", ("body.0",), ("srigl",)),
    ],
)
def test_options_the_method_never_reads_are_refused(method, field, value, used_by):
    # as DSTConfig refuses dynadiag's options under diagheur: an option that would do nothing is not recorded
    # as if it were used
    used = f"method={used_by[0]!r}" if len(used_by) == 1 else f"method in {used_by!r}"
    with pytest.raises(ValueError, match=re.escape(f"applies to {used} only, not method={method!r}")):
        MaskConfig(total_steps=10, method=method, **{field: value})
    MaskConfig(total_steps=10, method=method, **{field: MaskConfig.__dataclass_fields__[field].default})  # default


def test_shared_options_are_accepted_by_every_method():
    # the schedule, the budget and the seed are not refused anywhere (the CLI passes its seed to every method)
    for method in ("rigl", "srigl", "nm-srste", "nm-mask-decay", "nm-structure-decay"):
        MaskConfig(total_steps=10, method=method, update_every=3, drop_fraction=0.5, update_end=0.5, seed=3)
        MaskConfig(total_steps=10, method=method, budget="floor", no_ablation=[] if method != "srigl" else ["x"])
