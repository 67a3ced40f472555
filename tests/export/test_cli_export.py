"""``diagcompile export``: the CLI block in diagcompile/cli.py."""

import sys

import onnx
import pytest

from diagcompile import cli
from diagcompile.export import load
from diagcompile.export.onnx import count_plugin_nodes
from diagcompile.export.program import count_diag_nodes
from diagcompile.testing import ExportTestModel, run_python

FACTORY = """
from diagcompile.testing import make_export_model

def make():
    return make_export_model()

def not_a_pair():
    return 3
"""


@pytest.fixture()
def factory_from(tmp_path, monkeypatch):
    """``factory_from(name, source)``: write ``source`` as module ``name`` in a temporary working directory (the
    CLI imports factories from the cwd) and return ``"name:make"``; the modules are forgotten afterwards."""
    names = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the cwd; undo it afterwards

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return f"{name}:make"

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture()
def factory(factory_from):
    return factory_from("cli_export_factory", FACTORY)


def test_export_pt2_and_check(factory, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert cli.main(["export", factory, "--format", "pt2", "--out", str(out), "--batch", "7"]) == 0
    text = capsys.readouterr().out
    assert f"{ExportTestModel.N_DIAG_LAYERS} diagonal layer(s)" in text
    assert "max |artifact - eager|" in text and "at batch size 7: OK" in text
    assert count_diag_nodes(load(out)) == ExportTestModel.N_DIAG_LAYERS


@pytest.mark.parametrize("fmt", ["onnx", "onnx-plugin"])
def test_export_onnx_and_check(fmt, factory, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli.main(["export", factory, "--format", fmt, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max |artifact - eager|" in text and ": OK" in text
    assert f"{ExportTestModel.N_DIAG_LAYERS} diagonal layer(s)" in text  # the portable form too
    model = onnx.load(out)
    expected = ExportTestModel.N_DIAG_LAYERS if fmt == "onnx-plugin" else 0
    assert count_plugin_nodes(model) == expected


def test_export_fails_when_the_check_fails(factory, tmp_path, capsys):
    # A zero tolerance cannot be met by onnxruntime's float32 GEMM: the check must fail and say so.
    out = tmp_path / "m.onnx"
    args = ["export", factory, "--format", "onnx", "--out", str(out), "--atol", "0", "--rtol", "0"]
    assert cli.main(args) == 1
    assert "CHECK FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no.such.module:make", "cannot import"),
        ("cli_export_factory:missing", "has no attribute"),
        ("cli_export_factory:not_a_pair", "must return (model, example_args)"),
        ("not a reference", "neither an existing checkpoint file"),
    ],
)
def test_bad_source_is_a_clear_error(source, message, factory, tmp_path, capsys):
    assert cli.main(["export", source, "--out", str(tmp_path / "m.pt2")]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "m.pt2")]) == 2
    assert f"could not load the checkpoint {ckpt}" in capsys.readouterr().err


def test_unsupported_opset_is_reported(factory, tmp_path, capsys):
    assert cli.main(["export", factory, "--format", "onnx", "--opset", "9", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch", "0"], "--batch: must be an int >= 1"),
        (["--bare"], "--bare applies to --format onnx-plugin only"),
        (["--format", "pt2", "--opset", "18"], "--opset applies to the ONNX formats only"),
    ],
)
def test_bad_arguments_are_usage_errors(extra, message, factory, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", factory, "--out", str(tmp_path / "m.pt2"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()  # refused before anything was written


def test_an_output_path_that_is_a_directory_fails_before_exporting(factory, tmp_path, capsys):
    assert cli.main(["export", factory, "--out", str(tmp_path)]) == 2
    assert f"--out: {tmp_path} is a directory; give the path of the file to write (e.g. {tmp_path / 'model.pt2'})" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("fmt,name", [("onnx", "m.pt2"), ("onnx-plugin", "m"), ("pt2", "m.onnx")])
def test_an_output_name_of_another_format_fails_before_exporting(fmt, name, factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_resolve_export_source", lambda s: pytest.fail("the export started"))
    assert cli.main(["export", factory, "--format", fmt, "--out", str(tmp_path / name)]) == 2
    assert "should end in ." in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "pt2" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, suffix", [("pt2", "pt2"), ("onnx", "onnx")])
def test_export_a_trained_model_file(fmt, suffix, tmp_path, capsys):
    from diagcompile.train import MODEL_NAME, TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(task="digits-vit", method="dynadiag", sparsity=0.9, steps=4, out=str(out), quiet=True))
    target = tmp_path / f"m.{suffix}"
    assert cli.main(["export", str(out / MODEL_NAME), "--format", fmt, "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert target.is_file() and "check:" in printed and "CHECK FAILED" not in printed
    # The run's other file is its checkpoint: name the model file instead of "not a model file".
    assert cli.main(["export", str(out / "checkpoint.pt"), "--format", fmt, "--out", str(target)]) == 2
    assert f"is a training checkpoint (for --resume); the model file is {out / MODEL_NAME}" in capsys.readouterr().err


def test_export_dynamic_seq_checks_other_lengths(factory, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert cli.main(["export", factory, "--format", "pt2", "--out", str(out), "--dynamic-seq"]) == 0
    text = capsys.readouterr().out
    assert "at input shapes" in text and ": OK" in text
    shape = next(n.meta["val"].shape for n in load(out).graph.nodes if n.op == "placeholder" and n.name == "x")
    assert not isinstance(shape[0], int) and not isinstance(shape[1], int), shape


def test_export_dynamic_seq_of_a_model_that_fixes_the_length_fails_and_leaves_no_file(factory_from, tmp_path, capsys):
    source = factory_from("fixed_len_factory", FIXED_LENGTH_FACTORY)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", source, "--format", "onnx", "--out", str(out), "--dynamic-seq"]) == 2
    assert "fixes dim 1" in capsys.readouterr().err
    assert not out.exists()


FIXED_LENGTH_FACTORY = """
import torch
from diagcompile import DiagLinear

class Flatten(torch.nn.Module):  # uses the length as a constant: (B, 4, 8) -> (B, 32)
    def __init__(self):
        super().__init__()
        self.fc = DiagLinear(32, 16, sparsity=0.5)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 32))

def make():
    return Flatten().eval(), (torch.randn(2, 4, 8),)
"""


def test_onnx_export_prints_no_exporter_noise(tmp_path):
    # torch.onnx logs a warning per torchvision op it cannot register and trips a pytree FutureWarning; neither
    # is the user's to act on. A fresh process, with stderr joined to stdout before torch sets up its logging.
    code = (
        "import sys; sys.stderr = sys.stdout\n"
        "from diagcompile.export import to_onnx\n"
        "from diagcompile.testing import make_export_model\n"
        "model, args = make_export_model()\n"
        f"to_onnx(model, args, {str(tmp_path / 'm.onnx')!r})\n"
        "print('done')\n"
    )
    out = run_python(code, env={"PYTHONWARNINGS": "default"})
    assert out.strip().endswith("done")
    assert "torchvision" not in out and "LeafSpec" not in out, out


def test_export_dynamic_seq_with_a_batch_of_one_example(factory_from, tmp_path, capsys):
    source = factory_from(
        "batch_one_factory", FACTORY.replace("make_export_model()", "make_export_model(batch=(1, 5))")
    )
    out = tmp_path / "m.pt2"
    assert cli.main(["export", source, "--format", "pt2", "--out", str(out), "--dynamic-seq"]) == 0
    text = capsys.readouterr().out
    assert "at input shapes" in text and ": OK" in text


DICT_INPUT_FACTORY = """
import torch
from diagcompile import DiagLinear

class TwoStreams(torch.nn.Module):  # one dict argument: {"a": (B, T, 32), "b": (B, T, 32)}
    def __init__(self):
        super().__init__()
        self.fc = DiagLinear(32, 16, sparsity=0.5)

    def forward(self, streams):
        return self.fc(streams["a"]) - self.fc(streams["b"])

def make():
    return TwoStreams().eval(), ({"a": torch.randn(BATCH, 8, 32), "b": torch.randn(BATCH, 8, 32)},)
"""


@pytest.mark.parametrize("batch", [3, 1])
def test_export_dynamic_seq_of_a_dict_input(factory_from, tmp_path, capsys, batch):
    source = factory_from(f"dict_factory_{batch}", DICT_INPUT_FACTORY.replace("BATCH", str(batch)))
    out = tmp_path / "m.pt2"
    assert cli.main(["export", source, "--format", "pt2", "--out", str(out), "--dynamic-seq"]) == 0
    text = capsys.readouterr().out
    assert "at input shapes" in text and ": OK" in text
    shapes = [n.meta["val"].shape for n in load(out).graph.nodes if n.op == "placeholder" and "streams" in n.name]
    assert len(shapes) == 2 and all(not isinstance(s[0], int) and not isinstance(s[1], int) for s in shapes), shapes
