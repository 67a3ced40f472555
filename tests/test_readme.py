"""The README's API tour runs as written (on small stand-ins for the user's model and data)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from diagcompile import DiagSparsityConfig, sparsify_

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_tour() -> str:
    text = README.read_text()
    section = text.split("## API tour", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under '## API tour'"
    return match.group(1)


def test_readme_api_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tour writes model.pt2 / model.onnx into the working directory
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 64)
            self.out = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(x)))

    x = torch.randn(4, 32)
    loader = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    other = Net()
    # what the compiled `other` must compute: its marked `fc` reduced to the top-k diagonals of its weight
    expected = sparsify_(copy.deepcopy(other), DiagSparsityConfig(sparsity=0.9), filter_fn=lambda m, fqn: fqn == "fc")
    from diagcompile.models import CharGPT, GPTConfig, sparse_filter

    gpt = sparsify_(
        CharGPT(GPTConfig(vocab_size=20, block_size=256, dim=32, depth=1, heads=2)).eval(),
        DiagSparsityConfig(sparsity=0.9),
        filter_fn=sparse_filter,
    )
    scope = {"model": Net(), "other": other, "loader": loader, "loss_fn": nn.functional.cross_entropy, "x": x}
    scope["pretrained"] = Net()
    scope |= {"gpt": gpt, "ids": torch.randint(0, 20, (2, 16))}
    code = _api_tour().replace("total_steps=10_000", "total_steps=3")
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - executing our own README is the point

    from diagcompile import DiagLinear

    final = scope["model"]
    assert isinstance(final.fc, DiagLinear) and type(final.out) is nn.Linear  # the filter kept the head dense
    assert set(scope["report"]) == {"fc"} and scope["report"]["fc"]["k"] == final.fc.k
    pruned = scope["pretrained"]
    assert isinstance(pruned.fc, DiagLinear) and isinstance(pruned.out, DiagLinear)
    assert scope["y"].shape == (8, 197, 3072)
    seq_program = scope["ep"].module()
    for shape in ((3, 40), (1, 256)):  # the tour's GPT program takes other batch sizes and lengths
        ids = torch.randint(0, 20, shape)
        with torch.no_grad():
            torch.testing.assert_close(seq_program(ids), gpt(ids), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "model.onnx").is_file()
    import onnx

    (onnx_input,) = onnx.load(tmp_path / "model.onnx").graph.input
    assert onnx_input.name == "x" and onnx_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    from diagcompile.export.onnx import count_plugin_nodes

    assert count_plugin_nodes(tmp_path / "model_trt.onnx") == 1
    torch.testing.assert_close(scope["fast"](x), expected(x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected(x), Net.forward(other, x))  # the check can tell sparse from dense


def test_markdown_code_fences_are_balanced():
    """A stray fence turns the rest of a document into one code block on GitHub."""
    for doc in (README, README.parent / "ARCHITECTURE.md", README.parent / "passes" / "README.md"):
        fences = [i for i, line in enumerate(doc.read_text().splitlines(), 1) if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{doc.name}: unbalanced ``` fences at lines {fences}"
