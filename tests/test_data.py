"""Bundled data: digits split/patches and the stdlib character corpus (determinism, shapes, splits)."""

import hashlib
import sysconfig

import pytest
import torch

from diagcompile import data
from diagcompile.testing import run_python


# ---- digits ------------------------------------------------------------------------------------------
def test_digits_split_sizes_and_shapes():
    d = data.load_digits_split("test")
    assert d.x_train.shape == (1437, 16, 4) and d.x_eval.shape == (360, 16, 4)
    assert d.y_train.shape == (1437,) and d.y_eval.shape == (360,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    t = data.load_digits_split("tune")
    assert t.x_train.shape[0] == 1149 and t.x_eval.shape[0] == 288


def test_digits_split_is_stratified_and_normalised():
    d = data.load_digits_split("test")
    counts = torch.bincount(d.y_eval, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38, counts  # 360 / 10 classes, stratified
    pixels = d.x_train.double()
    assert abs(float(pixels.mean())) < 1e-5 and abs(float(pixels.std()) - 1) < 1e-3


def _image_keys(x: torch.Tensor) -> list[bytes]:
    return [hashlib.sha1(row.numpy().tobytes()).digest() for row in x.reshape(x.shape[0], -1)]


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    d = data.load_digits_split("test")
    raw = torch.from_numpy(load_digits().images.astype("float32") / 16.0)
    full = data.patchify((raw - d.mean) / d.std)
    # Multiset equality of images (the digits set has a few exact duplicates).
    assert sorted(_image_keys(full)) == sorted(_image_keys(d.x_train) + _image_keys(d.x_eval))
    t = data.load_digits_split("tune")
    tune_raw = torch.cat([t.x_train, t.x_eval]) * t.std + t.mean
    train_raw = d.x_train * d.std + d.mean
    # The tune split re-splits exactly the test split's training images (never a test image).
    assert sorted(_image_keys(tune_raw.round(decimals=4))) == sorted(_image_keys(train_raw.round(decimals=4)))


def test_patchify_layout():
    img = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    p = data.patchify(img)
    assert p.shape == (2, 16, 4)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                block = img[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1)
                assert torch.equal(p[n, i * 4 + j], block)


def test_patchify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        data.patchify(torch.zeros(1, 7, 8))
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        data.patchify(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="split"):
        data.load_digits_split("val")


# ---- chars -------------------------------------------------------------------------------------------
def test_vocab_and_encode_roundtrip():
    assert data.VOCAB_SIZE == 97 and data.VOCAB[0] == "<unk>" and data.VOCAB[1] == "\n"
    text = "def f(x):\n    return x ** 2  # ok ~{}|\n"
    ids = data.encode(text)
    assert ids.dtype == torch.uint8 and ids.numel() == len(text)
    assert int(ids.min()) >= 1 and int(ids.max()) < data.VOCAB_SIZE
    assert data.decode(ids) == text
    weird = data.encode("a\tπ€b")
    assert weird.tolist() == [data.VOCAB.index("a"), 0, 0, 0, data.VOCAB.index("b")]


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "x = 1\n",
        "json/decoder.py": "y = 2\n",
        "test/test_os.py": "assert True\n",
        "json/tests/test_x.py": "pass\n",
        "idlelib/run.py": "pass\n",
        "site-packages/pkg/mod.py": "pass\n",
        "encodings/cp1252.py": "pass\n",
        "_sysconfigdata__linux.py": "build = {}\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "pass\n",
        "README.txt": "not python\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_stdlib_files_excludes_tests_and_vendored_code(tmp_path):
    _fake_stdlib(tmp_path)
    assert data.stdlib_files(str(tmp_path)) == ["json/__init__.py", "json/decoder.py", "os.py"]


def test_stdlib_files_on_the_real_stdlib_is_sorted_and_clean():
    files = data.stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = f.split("/")
        assert not {"test", "tests", "idlelib", "site-packages", "lib2to3", "encodings"} & set(parts), f
        assert not parts[-1].startswith("_sysconfigdata"), f
    root = sysconfig.get_paths()["stdlib"]
    assert data.stdlib_files(root) == files


def test_file_split_depends_only_on_the_path():
    # Adding or removing other files (another Python version) never moves a file between splits.
    files = data.stdlib_files()
    buckets = {f: data._bucket(f) for f in files}
    assert {data._bucket(f) for f in files} == {"train", "val", "tune"}
    assert all(data._bucket(f) == b for f, b in reversed(list(buckets.items())))
    val_share = sum(b == "val" for b in buckets.values()) / len(files)
    assert 0.03 < val_share < 0.2


def test_load_chars_corpus():
    c = data.load_chars("test")
    info = c.info()
    assert c.train.dtype == torch.uint8 and c.eval.dtype == torch.uint8
    assert 1_000_000 < c.train.numel() <= data.TRAIN_CHARS and 100_000 < c.eval.numel() <= data.EVAL_CHARS
    assert int(c.train.max()) < data.VOCAB_SIZE
    assert info["unk_fraction_train"] < 1e-3
    assert info["file_list_sha256"] == hashlib.sha256("\n".join(data.stdlib_files()).encode()).hexdigest()
    assert info["eval_split"] == "val" and info["python"].count(".") == 2
    t = data.load_chars("tune")
    assert torch.equal(t.train, c.train)  # tuning never changes the training text
    assert not torch.equal(t.eval[:10_000], c.eval[:10_000])


_HASHES = (
    "import hashlib, diagcompile.data as d\n"
    "s, c = d.load_digits_split('test'), d.load_chars('test')\n"
    "print(hashlib.sha256(s.x_train.numpy().tobytes() + s.y_eval.numpy().tobytes()).hexdigest())\n"
    "print(hashlib.sha256(c.train.numpy().tobytes() + c.eval.numpy().tobytes()).hexdigest())\n"
)


def test_data_is_identical_in_a_fresh_process():
    s, c = data.load_digits_split("test"), data.load_chars("test")
    here = [
        hashlib.sha256(s.x_train.numpy().tobytes() + s.y_eval.numpy().tobytes()).hexdigest(),
        hashlib.sha256(c.train.numpy().tobytes() + c.eval.numpy().tobytes()).hexdigest(),
    ]
    assert run_python(_HASHES).split() == here


def test_sample_blocks_are_shifted_windows_and_seeded():
    text = torch.arange(1000, dtype=torch.int64) % 97
    text = text.to(torch.uint8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, y1 = data.sample_blocks(text, 8, 16, g1)
    x2, y2 = data.sample_blocks(text, 8, 16, g2)
    assert x1.shape == y1.shape == (8, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal((x1 + 1) % 97, y1)  # the text counts up, so every target is its input + 1
    x3, _ = data.sample_blocks(text, 8, 16, g1)
    assert not torch.equal(x1, x3)
    with pytest.raises(ValueError, match="too short"):
        data.sample_blocks(text[:16], 2, 16, g1)
    x4, y4 = data.sample_blocks(text[:17], 2, 16, g1)  # exactly one window: block inputs + one target
    assert torch.equal(x4[0], text[:16].long()) and torch.equal(y4[1], text[1:17].long())


def test_eval_blocks_cover_the_text():
    text = torch.arange(101, dtype=torch.uint8)
    x, y = data.eval_blocks(text, 10)
    assert x.shape == (10, 10)
    assert torch.equal(x.reshape(-1), torch.arange(100)) and torch.equal(y.reshape(-1), torch.arange(1, 101))
    xs, _ = data.eval_blocks(text, 10, max_blocks=4)  # evenly spaced over the 10 blocks
    assert xs[:, 0].tolist() == [0, 30, 60, 90]


def test_data_module_imports_no_heavy_packages():
    out = run_python(
        "import sys, diagcompile.data, diagcompile.models, diagcompile.train, diagcompile.sweep\n"
        "print([m for m in ('sklearn', 'matplotlib', 'scipy') if m in sys.modules])\n"
    )
    assert out.strip() == "[]"
