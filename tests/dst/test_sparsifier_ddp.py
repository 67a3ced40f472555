"""A real 2-process gloo DDP run of every sparsifier family (DiagSparsifier: offsets; MaskSparsifier: masks):
identical topology and parameters on both ranks after every step, and the same losses and topology as one
process on the same global batches."""

import pathlib
import subprocess
import sys

import pytest
import torch

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")
CONFIGS = ["diagheur", "dynadiag-pool", "dynadiag", "rigl", "srigl", "nm-mask-decay"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # A script file, not `python -c`: torch.multiprocessing's spawn re-imports the main module by path.
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tuple(torch.load(out / f, weights_only=True) for f in ("rank0.pt", "rank1.pt", "single.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_both_ranks_hold_identical_topology_and_parameters(results, name):
    r0, r1, _ = (r[name] for r in results)
    for t, (a, b) in enumerate(zip(r0["topology"], r1["topology"])):
        for fqn in a:
            assert torch.equal(a[fqn], b[fqn]), f"step {t + 1}, {fqn}: offsets/masks differ across ranks"
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["losses"] == r1["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_construction_alone_makes_ranks_agree(results, name):
    # Each rank seeded differently and no DDP wrapper: only the sparsifier's own broadcast can make the converted
    # layers (values, offsets, masks, alpha, buffers) identical.
    r0, r1 = results[0]["constructed"][name], results[1]["constructed"][name]
    for fqn in r0["topology"]:
        assert torch.equal(r0["topology"][fqn], r1["topology"][fqn]), f"{fqn}: initial topology differs"
    for fqn, state in r0["layers"].items():
        for key, v in state.items():
            assert torch.equal(v, r1["layers"][fqn][key]), f"{fqn}.{key} differs across ranks after construction"


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_ddp_matches_one_process_on_the_global_batch(results, name):
    r0, single = results[0][name], results[2][name]
    changed = 0
    for t, (a, b) in enumerate(zip(r0["topology"], single["topology"])):
        for fqn in a:
            assert torch.equal(a[fqn], b[fqn]), f"step {t + 1}, {fqn}: DDP and single-process topologies differ"
        if t and any(not torch.equal(a[f], r0["topology"][t - 1][f]) for f in a):
            changed += 1
    assert changed > 0, "the topology never changed: the test would prove nothing"
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6)
    for key, v in single["state"].items():
        assert torch.allclose(r0["state"][key].double(), v.double(), rtol=1e-3, atol=1e-5), key
