"""DSTConfig: defaults, validation with named errors, derived steps, dict round trip."""

import dataclasses

import numpy as np
import pytest

from diagcompile.dst import DSTConfig
from diagcompile.dst.config import DIAGHEUR_ONLY, DYNADIAG_ONLY


def test_defaults_are_the_papers_and_riGLs():
    cfg = DSTConfig(total_steps=1000)
    assert cfg.method == "dynadiag" and cfg.relaxation == "threshold" and cfg.pool is None
    assert (cfg.update_every, cfg.drop_fraction, cfg.update_end) == (100, 0.3, 0.75)
    assert cfg.freeze_step == 500
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5


def test_freeze_at_fraction_vs_absolute_step():
    assert DSTConfig(total_steps=1000, freeze_at=0.25).freeze_step == 250
    assert DSTConfig(total_steps=1000, freeze_at=1).freeze_step == 1  # an int is a step, not a fraction
    assert DSTConfig(total_steps=1000, freeze_at=1.0).freeze_step == 1000
    assert DSTConfig(total_steps=1000, freeze_at=0).freeze_step == 0


def test_update_end_step_depends_on_method():
    assert DSTConfig(total_steps=1000, method="diagheur").update_end_step == 750
    assert DSTConfig(total_steps=1000, method="dynadiag", freeze_at=0.4).update_end_step == 400


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 10.0}, TypeError, "total_steps"),
        ({"method": "rigl"}, ValueError, "method"),
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"update_every": 0}, ValueError, "update_every"),
        ({"drop_fraction": 1.5}, ValueError, "drop_fraction"),
        ({"offset_init": "spiral"}, ValueError, "offset_init"),
        ({"relaxation": "gumbel"}, ValueError, "relaxation"),
        ({"temperature_schedule": "step"}, ValueError, "temperature_schedule"),
        ({"temperature_start": 0.0}, ValueError, "temperature_start"),
        ({"temperature_end": float("nan")}, ValueError, "temperature_end"),
        ({"freeze_at": 1.5}, ValueError, "freeze_at"),
        ({"freeze_at": 101}, ValueError, "freeze_at"),
        ({"freeze_at": True}, TypeError, "freeze_at"),
        ({"alpha_lr": -1.0}, ValueError, "alpha_lr"),
        ({"active_eps": 0.5}, ValueError, "active_eps"),
        ({"pool": 0.5}, ValueError, "pool"),
        ({"soft_scale": "l2"}, ValueError, "soft_scale"),
        ({"rescale_init": 1}, TypeError, "rescale_init"),
    ],
)
def test_validation_names_the_field(kwargs, exc, match):
    kwargs = {"total_steps": 100, **kwargs}
    with pytest.raises(exc, match=match):
        DSTConfig(**kwargs)


def test_dict_round_trip_is_plain_python():
    cfg = DSTConfig(total_steps=77, method="dynadiag", pool=2.0, freeze_at=5)
    d = cfg.to_dict()
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in d.values())
    assert DSTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DSTConfig.from_dict({**d, "beta": 1})


#: A valid non-default value of every field only dynadiag reads.
DYNADIAG_VALUES = {
    "relaxation": "softmax_clamp",
    "pool": 2.0,
    "temperature_schedule": "linear",
    "temperature_start": 0.1,
    "temperature_end": 0.01,
    "freeze_at": 0.25,
    "fold_at_freeze": False,
    "alpha_lr": 0.05,
    "alpha_l1": 1e-4,
    "alpha_init": 0.3,
    "alpha_init_noise": 0.0,
    "active_eps": 1e-3,
    "soft_scale": "rms",
}


def test_every_dynadiag_only_field_is_listed_and_tested():
    assert set(DYNADIAG_VALUES) == set(DYNADIAG_ONLY)
    assert set(DYNADIAG_ONLY) | set(DIAGHEUR_ONLY) < {f.name for f in dataclasses.fields(DSTConfig)}


@pytest.mark.parametrize("field,value", list(DYNADIAG_VALUES.items()))
def test_dynadiag_options_are_refused_for_diagheur(field, value):
    with pytest.raises(ValueError, match=rf"DSTConfig.{field}=.* to method='dynadiag' only, not method='diagheur'"):
        DSTConfig(total_steps=100, method="diagheur", **{field: value})
    DSTConfig(total_steps=100, method="dynadiag", **{field: value})
    # the defaults are no choice, so a diagheur config built from defaults (or a saved dict of one) is fine
    default = DSTConfig(total_steps=100, method="diagheur")
    assert DSTConfig.from_dict(default.to_dict()) == default


def test_update_end_is_refused_for_dynadiag():
    with pytest.raises(ValueError, match=r"DSTConfig.update_end=0.5 applies to method='diagheur' only"):
        DSTConfig(total_steps=100, method="dynadiag", update_end=0.5)
    assert DSTConfig(total_steps=100, method="diagheur", update_end=0.5).update_end_step == 50
    default = DSTConfig(total_steps=100)
    assert DSTConfig.from_dict(default.to_dict()) == default


def test_numpy_scalars_are_accepted_and_stored_as_plain_python():
    # Values read from numpy (a grid, np.linspace, a loaded .npz) are numbers.Integral / numbers.Real; the config
    # keeps plain int / float so that to_dict(), JSON and weights_only checkpoints stay plain.
    cfg = DSTConfig(
        total_steps=np.int64(100),
        sparsity=np.float32(0.75),
        update_every=np.int32(10),
        drop_fraction=np.float64(0.2),
        temperature_start=np.float32(0.5),
        freeze_at=np.int64(40),
        alpha_init=np.float16(0.25),
        pool=np.float64(2.0),
    )
    assert cfg == DSTConfig(
        total_steps=100,
        sparsity=float(np.float32(0.75)),
        update_every=10,
        drop_fraction=0.2,
        temperature_start=0.5,
        freeze_at=40,
        alpha_init=0.25,
        pool=2.0,
    )
    types = {name: type(v) for name, v in cfg.to_dict().items()}
    assert types["total_steps"] is int and types["update_every"] is int and types["freeze_at"] is int
    assert all(types[n] is float for n in ("sparsity", "drop_fraction", "temperature_start", "alpha_init", "pool"))
    assert cfg.freeze_step == 40  # a numpy integer freeze_at is an absolute step, like an int
    assert DSTConfig(total_steps=100, freeze_at=np.float32(0.25)).freeze_step == 25  # a numpy float, a fraction
    assert type(DSTConfig(total_steps=100, freeze_at=np.float32(0.25)).freeze_at) is float
    diagheur = DSTConfig(total_steps=np.int16(8), method="diagheur", update_end=np.float32(0.5))
    assert type(diagheur.update_end) is float and diagheur.update_end_step == 4


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"total_steps": "100"}, TypeError, r"DSTConfig.total_steps='100' must be an int"),
        ({"total_steps": True}, TypeError, r"DSTConfig.total_steps=True must be an int"),
        ({"total_steps": np.float64(100.0)}, TypeError, r"DSTConfig.total_steps=.*must be an int"),
        ({"total_steps": np.bool_(True)}, TypeError, r"DSTConfig.total_steps=.*must be an int"),
        ({"total_steps": np.array(100)}, TypeError, r"DSTConfig.total_steps=.*must be an int"),
        ({"sparsity": "0.9"}, TypeError, r"DSTConfig.sparsity='0.9' must be a real number"),
        ({"sparsity": np.array([0.9])}, TypeError, r"DSTConfig.sparsity=.*must be a real number"),
        ({"sparsity": np.bool_(False)}, TypeError, r"DSTConfig.sparsity=.*must be a real number"),
        ({"sparsity": np.float32(1.0)}, ValueError, r"DSTConfig.sparsity=.*must be in \[0.0, 1.0\)"),
        ({"update_every": np.int64(0)}, ValueError, r"DSTConfig.update_every=.*must be >= 1"),
        ({"freeze_at": np.bool_(True)}, TypeError, "DSTConfig.freeze_at"),
        ({"freeze_at": np.int64(101)}, ValueError, r"freeze_at=.* \(an absolute step\) must be in \[0, total"),
    ],
)
def test_non_numbers_are_still_refused_with_the_same_messages(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DSTConfig(**{"total_steps": 100, **kwargs})
