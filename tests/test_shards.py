"""`ShardWriter`: groups go to disk as they arrive, shards are cut at group boundaries, and the files are the
safetensors a whole-model writer would make."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from toolchain.models import shards
from toolchain.models.shards import INDEX, ShardWriter, write_safetensors


def layer(i: int, width: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {f"model.layers.{i}.w": torch.randn(width, width, generator=g),
            f"model.layers.{i}.b": torch.randn(width, generator=g),
            f"model.layers.{i}.codes": torch.randint(0, 15, (width, 4), generator=g, dtype=torch.int32)}


def write(directory, groups, max_bytes, dtype=torch.bfloat16):
    writer = ShardWriter(directory, dtype, max_bytes)
    for g in groups:
        writer.add(g)
    return writer.close()


def test_shards_hold_every_tensor_converted_and_cut_at_groups(tmp_path):
    groups = [layer(i) for i in range(5)]
    one_layer = 16 * 16 * 2 + 16 * 2 + 16 * 4 * 4    # bf16 weight and bias, int32 codes
    out = write(tmp_path / "out", groups, max_bytes=2 * one_layer)
    index = json.loads((out / INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]   # 2 + 2 + 1 layers
    assert index["metadata"]["total_size"] == 5 * one_layer
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no data file left behind
    for g in groups:
        for name, t in g.items():
            got = load_file(out / index["weight_map"][name])[name]
            want = t.to(torch.bfloat16) if t.is_floating_point() else t
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert len({index["weight_map"][n] for n in g}) == 1           # a group never spans two shards


def test_a_shard_is_byte_identical_to_a_whole_file_write(tmp_path):
    groups = [layer(i) for i in range(3)]
    out = write(tmp_path / "out", groups, max_bytes=1 << 30, dtype=None)
    whole = tmp_path / "whole.safetensors"
    write_safetensors(whole, [(n, t.dtype, tuple(t.shape), lambda t=t: t) for g in groups for n, t in g.items()],
                      {"format": "pt"})
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == whole.read_bytes()


def test_the_copy_falls_back_where_the_file_system_has_no_copy_file_range(tmp_path, monkeypatch):
    groups = [layer(i) for i in range(3)]
    reference = write(tmp_path / "kernel", groups, max_bytes=1 << 30)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(shards.os, "copy_file_range", refuse)
    fallback = write(tmp_path / "buffered", groups, max_bytes=1 << 30)
    name = "model-00001-of-00001.safetensors"
    assert (fallback / name).read_bytes() == (reference / name).read_bytes()


def test_a_tensor_written_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path / "out")
    writer.add(layer(0))
    with pytest.raises(ValueError, match="written twice"):
        writer.add(layer(0))


def test_a_short_data_file_is_an_error(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path / "out")
    writer.add(layer(0))
    writer._data.flush()
    os.truncate(writer._data.name, 10)
    with pytest.raises(OSError, match="ended .* bytes early"):
        writer.close()
