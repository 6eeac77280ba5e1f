"""`toolchain bench scale` on a tiny shape: the step plan, the streamed chain, the checks on its outputs, and
that it leaves no model folder behind."""
from __future__ import annotations

import json

import pytest

from toolchain.bench import scale
from toolchain.errors import ConfigError

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def test_the_plan_runs_what_only_names_and_the_steps_it_reads_from():
    full = scale.scale_plan(None)
    assert full == {8: list(scale.STEPS), 32: list(scale.STEPS)}
    # the checkpoint readers first, so at most the checkpoint and one output are on disk at once
    assert [s for s in scale.STEPS if scale.STEPS[s][0] is None] == list(scale.STEPS)[:3]
    assert scale.scale_plan(["onnx@32"]) == {32: ["wanda", "rtn", "onnx"]}
    assert scale.scale_plan(["gptq", "blob@8"]) == {8: ["gptq", "wanda", "rtn", "blob"], 32: ["gptq"]}
    with pytest.raises(ConfigError, match="'onnx@16'"):
        scale.scale_plan(["onnx@16"])


def test_the_streamed_chain_on_a_tiny_shape_checks_its_outputs_and_cleans_up(tmp_path, tiny_llama_dir):
    out = tmp_path / "results"
    result = scale.run_scale_bench(str(tiny_llama_dir), out, only=["sparsegpt@8", "blob@8"], shape=TINY)
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["sparsegpt", "wanda", "rtn", "blob"]
    for step in ("sparsegpt", "wanda"):
        assert rows[step]["dtypes"] == ["bfloat16"]
        assert rows[step]["linears_checked"] == 8 * 7 and rows[step]["linears_not_2of4"] == 0
    assert rows["rtn"]["quant_state"] is True
    assert rows["blob"]["blob_tensors"] > 0
    assert all(r["layers"] == 8 and r["peak_rss_mib"] > 0 for r in result["rows"])
    saved = json.loads((out / "scale_llama3-8b-shape.json").read_text())
    assert [r["step"] for r in saved["rows"]] == list(rows)
    assert "| 8 | blob |" in (out / "scale_llama3-8b-shape.md").read_text()
    assert not list((out / "work").glob("scale-*"))   # the checkpoint and every output deleted
