"""onnxruntime (CPU) speed and file size of the portable ONNX form vs the alternatives, float32.

    python benchmarks/bench_onnx_cpu.py          # -> benchmarks/results/onnx_cpu.{csv,md}
    python benchmarks/bench_onnx_cpu.py --quick  # one shape, M=1 only, no results file

For one diagonal layer at 90% sparsity, per batch size M, the median time of one session.run:

* ``portable``: ``to_onnx(mode="portable")``: values + offsets in the file, ``ScatterND`` rebuilds the dense
  weight (folded by onnxruntime at load time), then ``MatMul``;
* ``dense``: the same layer exported as a dense ``nn.Linear`` (the dense weight in the file);
* ``gather``: the ``Gather -> Mul -> ReduceSum`` decomposition (tall layers: ``x`` padded with a zero column and
  a (k, N_out) index), indices precomputed as initializers: the form we did not ship.

All timings of a row come from the same run, interleaved (``common.compare_ms``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_ms, write_results  # noqa: E402

from diagcompile import DiagLinear  # noqa: E402
from diagcompile.export.onnx import to_onnx  # noqa: E402

#: (name, in_features, out_features)
SHAPES = [("ViT fc2 3072->768 (wide)", 3072, 768), ("ViT fc1 768->3072 (tall)", 768, 3072)]
BATCHES = [1, 16, 197]


def _session(model: str | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _gather_model(layer: DiagLinear) -> bytes:
    n_in, n_out = layer.in_features, layer.out_features
    offs = layer.offsets.long()
    values = layer.values.detach()
    if n_out <= n_in:
        idx = (torch.arange(n_out)[None] + offs[:, None]) % n_in
        vals, pad = values, []
    else:
        c = (torch.arange(n_out)[None] - offs[:, None]) % n_out
        valid = c < n_in
        idx = torch.where(valid, c, n_in)
        vals = torch.where(valid, values.gather(1, torch.where(valid, c, 0)), 0.0)
        pad = [helper.make_node("Pad", ["x", "pads"], ["x_pad"])]
    src = "x_pad" if pad else "x"
    nodes = pad + [
        helper.make_node("Gather", [src, "idx"], ["g"], axis=-1),
        helper.make_node("Mul", ["g", "v"], ["p"]),
        helper.make_node("ReduceSum", ["p", "axes"], ["y0"], keepdims=0),
        helper.make_node("Add", ["y0", "b"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(idx.numpy(), "idx"),
        numpy_helper.from_array(vals.numpy(), "v"),
        numpy_helper.from_array(np.array([-2]), "axes"),
        numpy_helper.from_array(layer.bias.detach().numpy(), "b"),
        numpy_helper.from_array(np.array([0, 0, 0, 1]), "pads"),
    ]
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n_out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    shapes, batches = (SHAPES[:1], [1]) if args.quick else (SHAPES, BATCHES)
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        for name, n_in, n_out in shapes:
            layer = DiagLinear(n_in, n_out, sparsity=0.9).eval()
            dense = torch.nn.Linear(n_in, n_out).eval()
            with torch.no_grad():
                dense.weight.copy_(layer.to_dense())
                dense.bias.copy_(layer.bias)
            ex = (torch.randn(2, n_in),)
            p_portable = to_onnx(layer, ex, Path(d) / "portable.onnx")
            p_dense = Path(d) / "dense.onnx"
            torch.onnx.export(
                dense, ex, p_dense, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
            )
            sessions = {
                "portable": _session(str(p_portable)),
                "dense": _session(str(p_dense)),
                "gather": _session(_gather_model(layer)),
            }
            sizes = {"portable": p_portable.stat().st_size, "dense": onnx.load(p_dense).ByteSize()}
            for M in batches:
                x = np.random.default_rng(M).standard_normal((M, n_in), dtype=np.float32)
                ref = layer(torch.from_numpy(x)).detach().numpy()
                feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
                for k, s in sessions.items():  # correctness first
                    err = float(np.abs(s.run(None, feeds[k])[0] - ref).max())
                    assert err < 1e-3, (k, err)
                fns = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
                ms = compare_ms(fns, rounds=3, warmup=2, reps=5, min_time_s=0.2)
                rows.append(
                    {
                        "layer": name,
                        "M": M,
                        "portable_ms": ms["portable"],
                        "dense_ms": ms["dense"],
                        "gather_ms": ms["gather"],
                        "portable_file_MB": sizes["portable"] / 1e6,
                        "dense_file_MB": sizes["dense"] / 1e6,
                    }
                )
                print(rows[-1])
    if not args.quick:
        md = write_results(
            "onnx_cpu",
            rows,
            "onnxruntime CPU: portable ONNX form vs dense vs Gather/Mul/ReduceSum (float32, 90% sparsity)",
            notes=f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; intra_op threads = torch threads.",
        )
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
