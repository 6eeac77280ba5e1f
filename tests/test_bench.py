"""The benchmarks' plumbing (toolchain.bench), without running a benchmark: `--only` picks exactly the rows it
names and refuses unknown ones, a partial run keeps the other rows, everything is written under --out, and the
blob is measured through its public API."""
from __future__ import annotations

import json

import pytest
import torch

from toolchain.bench import common, prune
from toolchain.bench.common import merge_rows, write_result
from toolchain.bench.export import FORMS, export_forms, writer_throughput
from toolchain.bench.prune import PRUNE_CONFIGS, SPARSITIES, prune_runs
from toolchain.bench.quality import quality_configs, quality_runs
from toolchain.bench.quant import PEER_PREFIX, QUANT_CONFIGS, quant_runs, quant_table
from toolchain.bench.registry import BENCHMARKS, TAKES_ONLY, run_benchmark
from toolchain.bench.structured import CONFIGS as STRUCTURED_CONFIGS, SPARSITIES as STRUCTURED_SPARSITIES, \
    decoder_cycles, decoder_params, structured_runs, structured_table
from toolchain.cli import main
from toolchain.errors import ConfigError


def test_prune_only_selects_by_name_or_name_at_sparsity():
    assert len(prune_runs()) == len(PRUNE_CONFIGS) * len(SPARSITIES)
    assert [(r[0], r[4]) for r in prune_runs(["wanda@2:4"])] == [("wanda", "2:4")]
    assert [(r[0], r[4]) for r in prune_runs(["wanda"])] == [("wanda", s) for s in SPARSITIES]
    assert prune_runs(["dense"]) == []          # the dense row alone: no pruning run


def test_quant_only_selects_by_name():
    assert quant_runs() == QUANT_CONFIGS
    assert [r[0] for r in quant_runs(["gptq 3-bit", "dense"])] == ["gptq 3-bit"]


def test_quality_only_runs_in_the_order_asked():
    assert len(quality_runs()) == sum(len(sp) for *_, sp in quality_configs())
    runs = quality_runs(["sparsegpt@0.7", "wanda@0.5"])
    assert [(r[0], r[4]) for r in runs] == [("sparsegpt", "0.7"), ("wanda", "0.5")]


def test_export_only_selects_onnx_forms():
    assert export_forms() == list(FORMS)
    assert export_forms(["matmulnbits acc4", "qdq"]) == ["qdq", "matmulnbits acc4"]


def test_structured_only_selects_by_name_or_name_at_sparsity():
    assert len(structured_runs(None)) == len(STRUCTURED_CONFIGS) * len(STRUCTURED_SPARSITIES)
    assert [(r[0], r[3]) for r in structured_runs(["taylor@0.3", "flap@0.2"])] == [("taylor", "0.3"), ("flap", "0.2")]
    assert structured_runs(["dense"]) == []


def test_structured_bench_counts_cycles_and_parameters_of_the_smaller_model(tmp_path, tiny_llama_dir):
    from toolchain.fpga.config import AccelConfig
    from toolchain.jobs.config import PruneConfig
    from toolchain.jobs.prune import run_prune

    out = tmp_path / "s"
    run_prune(str(tiny_llama_dir), out, PruneConfig(structured=True, sparsity="0.3", calib_samples=4, seqlen=16),
              progress=False)
    design = AccelConfig().dense_twin()
    for path in (tiny_llama_dir, out):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path)
        linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert decoder_cycles(path) == sum(design.layer_cycles(m.in_features, m.out_features) for m in linears)
        assert decoder_params(path) == sum(p.numel() for p in model.model.layers.parameters())
    assert decoder_cycles(out) < decoder_cycles(tiny_llama_dir)
    report = json.loads((out / "compression.json").read_text())
    assert decoder_params(out) == report["decoder_params"]["after"]


def test_structured_table_bolds_the_best_of_each_sparsity():
    row = {"sparsity": "0.2", "removed_fraction": 0.2, "decoder_params": 8e7, "ppl_pydoc": 20.0, "ppl_wiki": 30.0,
           "ppl_science": 40.0, "prune_seconds": 10, "peak_rss_mib": 900, "prefill_x_dense": 0.8,
           "decode_x_dense": 0.9, "decode_ms_per_token": 5.0, "cycles_x_dense": 0.8, "command": "toolchain prune x"}
    result = {"model": "m", "calibration": "c", "eval": "e", "threads": 2, "rows": [
        {**row, "name": "obs-refit", "ppl_pydoc": 18.0}, {**row, "name": "flap", "prune_seconds": 5}],
        "dense": {"decoder_params": 1e8, "ppl_pydoc": 10.0, "ppl_wiki": 20.0, "ppl_science": 30.0, "cycles": 1000}}
    table = structured_table(result)
    assert "| obs-refit | 80.00 | **18.00** |" in table and "| flap | 80.00 | 20.00 |" in table
    assert "| **5** |" in table and "toolchain prune x" in table


@pytest.mark.parametrize("select", [prune_runs, quant_runs, quality_runs, export_forms, structured_runs])
def test_unknown_only_names_are_refused_by_name(select):
    with pytest.raises(ConfigError, match="'wanda@3:4'"):
        select(["wanda@3:4"])


@pytest.mark.parametrize("what", TAKES_ONLY)
def test_unknown_only_is_refused_before_any_work(what, tmp_path):
    # the model does not exist: a benchmark that started work would fail on it, not on --only
    with pytest.raises(ConfigError, match="unknown configuration 'nope'"):
        run_benchmark(what, str(tmp_path / "no-model"), tmp_path / "out", only=["nope"])
    assert not (tmp_path / "out").exists()


def test_fpga_takes_no_only(tmp_path, capsys):
    assert set(BENCHMARKS) - set(TAKES_ONLY) == {"fpga", "fpga-dram", "fpga-eval", "fpga-pnr"}
    with pytest.raises(ConfigError, match="bench fpga takes no --only"):
        run_benchmark("fpga", str(tmp_path / "no-model"), tmp_path / "out", only=["q_proj"])
    assert main(["bench", "fpga", "--only", "q_proj", "--out", str(tmp_path / "out")]) == 2
    assert "takes no --only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_help_describes_every_benchmark_the_registry_runs(capsys):
    """The parser cannot import the benchmarks (they sit above it), so it keeps its own list of them; it must be
    the registry's, each with a description in `--help`."""
    from toolchain.cli.parser import BENCHMARKS as DESCRIBED

    assert list(DESCRIBED) == list(BENCHMARKS)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert all(f"\n  {name} " in text for name in BENCHMARKS)


def test_partial_run_replaces_its_rows_and_keeps_the_others(tmp_path):
    stem = tmp_path / "export_tiny"

    def table(r):
        return "".join(f"{x['form']}={x['v']}\n" for x in r["onnx"])

    rows = [{"form": f, "v": 0} for f in FORMS]
    write_result(stem, {"onnx": rows, "partial": False}, list(FORMS), lambda r: r["form"], table, rows="onnx")
    write_result(stem, {"onnx": [{"form": "qdq", "v": 1}], "partial": True}, list(FORMS), lambda r: r["form"],
                 table, rows="onnx")
    saved = json.loads((tmp_path / "export_tiny.json").read_text())
    assert "partial" not in saved
    assert [(r["form"], r["v"]) for r in saved["onnx"]] == [("float", 0), ("qdq", 1), ("matmulnbits", 0),
                                                              ("matmulnbits acc4", 0)]
    assert merge_rows([], [{"form": "x"}], list(FORMS), lambda r: r["form"]) == [{"form": "x"}]

    # a write that fails part-way (here: the table) leaves the earlier result whole and no stray file
    before = sorted(p.name for p in tmp_path.iterdir()), (tmp_path / "export_tiny.json").read_text()

    def broken(r):
        raise RuntimeError("table failed")

    with pytest.raises(RuntimeError, match="table failed"):
        write_result(stem, {"onnx": rows, "partial": False}, list(FORMS), lambda r: r["form"], broken, rows="onnx")
    assert (sorted(p.name for p in tmp_path.iterdir()), (tmp_path / "export_tiny.json").read_text()) == before


def test_prune_bench_runs_only_what_is_asked_and_writes_under_out(tmp_path, monkeypatch):
    """The whole prune benchmark with its runs faked: --only decides the rows, and nothing lands in the cwd."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    made = []

    def fake_prune(src, target, method, init, sparsity, extra):
        made.append(target)
        return {"prune_seconds": 1.0, "peak_rss_mib": 10.0, "peak_anon_mib": 5.0, "command": "toolchain prune"}

    monkeypatch.setattr(prune, "dense_hf_dir", lambda model, cache: cache / "dense")
    monkeypatch.setattr(prune, "model_fp32_mib", lambda path: 10.0)
    monkeypatch.setattr(prune, "heldout_perplexity", lambda path: 20.0)
    monkeypatch.setattr(prune, "prune_in_subprocess", fake_prune)
    result = prune.run_prune_bench("tiny", out, only=["barber(sparsegpt)@2:4"])
    assert [(r["name"], r["sparsity"]) for r in result["rows"]] == [("barber(sparsegpt)", "2:4")]
    assert made == [common.work_dir(out) / "barber-sparsegpt-2of4"]
    assert (out / "prune_tiny.json").is_file() and (out / "prune_tiny.md").is_file()
    assert list(cwd.iterdir()) == []


def test_writer_throughput_drives_the_public_blob_api(compressed_dir, tmp_path):
    from toolchain.quant import read_quant_state

    src = compressed_dir("llama", "2:4", 4)
    r = writer_throughput(src, tmp_path)
    weights = sum(qw.codes.numel() for qw in read_quant_state(src / "quant_state.safetensors").values())
    assert r["weights"] == weights
    assert r["encode_mb_per_s"] > 0 and r["decode_mb_per_s"] > 0
    assert list(tmp_path.iterdir()) == []       # its temporary blob is gone


def _accepted(cmd: list[str]) -> None:
    """The command a benchmark runs passes the CLI's parse and validation, no-op flags included."""
    from toolchain.cli import build_parser
    from toolchain.jobs.config import PruneConfig, QuantConfig
    from toolchain.jobs.options import config_from_args

    args = build_parser().parse_args(cmd[3:])   # without the interpreter and `-m toolchain.cli`
    cfg, given = config_from_args(PruneConfig if args.command == "prune" else QuantConfig, args)
    cfg.validate(given)


def test_every_benchmark_command_is_one_the_cli_accepts(tmp_path):
    """The prune, quality and quant benchmarks and the demo run `toolchain prune|quantize` commands; each must
    pass the CLI's checks, so calibration flags go only to a job that calibrates (magnitude and RTN do not)."""
    from toolchain.reference_runs import prune_command, quantize_command

    commands = [prune_command(tmp_path, tmp_path / "o", m, i, s, extra) for _, m, i, extra in PRUNE_CONFIGS
                for s in SPARSITIES]
    commands += [prune_command(tmp_path, tmp_path / "o", m, i, s, extra) for _, m, i, extra, sp in quality_configs()
                 for s in sp]
    commands += [quantize_command(tmp_path, tmp_path / "o", m, bits, extra) for _, _, m, bits, extra in QUANT_CONFIGS
                 if not m.startswith(PEER_PREFIX)]   # the peers run in their own environment
    for cmd in commands:
        _accepted(cmd)
    magnitude = prune_command(tmp_path, tmp_path / "o", "magnitude", None, "0.5", [])
    rtn = quantize_command(tmp_path, tmp_path / "o", "rtn", "4", [])
    gptq = quantize_command(tmp_path, tmp_path / "o", "gptq", "4", [])
    assert "--calib-samples" not in magnitude and "--calib-samples" not in rtn and "--calib-samples" in gptq


def test_quant_table_has_a_column_per_evaluation_text():
    """Rows measured on every text and an older row with only pydoc's number share one table."""
    result = {"model": "m", "group_size": 64, "calibration": "pydoc 32x512, seed 0", "eval": "e",
              "rows": [{"name": "dense (fp32)", "ppl": {"pydoc": 14.0, "wiki": 20.0, "science": 30.0}},
                       {"name": "llm-compressor gptq 4-bit", "ppl": {"pydoc": 16.0, "wiki": 22.5, "science": 33.0},
                        "avg_bits": 4, "quant_seconds": 10.0},
                       {"name": "old", "ppl": 17.0}]}
    lines = quant_table(result).splitlines()
    assert "| configuration | ppl pydoc | ppl wiki | ppl science |" in lines[2]
    assert lines[5].startswith("| llm-compressor gptq 4-bit | 16.00 | 22.50 | 33.00 | 4 |")
    assert lines[6].startswith("| old | 17.00 | - | - |")


def test_peer_weights_must_match_the_model(tiny_llama_dir):
    from toolchain.bench.peers import with_weights
    from toolchain.errors import ToolchainError
    from toolchain.models import load_model

    loaded = load_model(tiny_llama_dir)
    name, param = next((n, p) for n, p in loaded.model.named_parameters() if n.endswith("q_proj.weight"))
    with_weights(loaded, {name: torch.zeros_like(param)})
    assert float(dict(loaded.model.named_parameters())[name].abs().sum()) == 0.0
    with pytest.raises(ToolchainError, match="does not match"):
        with_weights(loaded, {name: torch.zeros(3, 3)})
    with pytest.raises(ToolchainError, match="does not match"):
        with_weights(loaded, {"model.nothing.weight": torch.zeros(3)})


def test_genai_reference_uses_the_exported_int4_head_and_leaves_the_model_alone():
    from conftest import tiny_loaded

    from toolchain.bench.export_genai import NEW_TOKENS, reference_tokens
    from toolchain.export.onnx.weights import lm_head_codes
    from toolchain.export.onnx_check import torch_greedy

    model = tiny_loaded("llama").model.eval()
    head = model.get_output_embeddings().weight.detach().clone()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_tokens = reference_tokens(model, ids, "float")
        int4_tokens = reference_tokens(model, ids, "int4")
        assert torch.equal(model.get_output_embeddings().weight, head)   # a copy carries the int4 head
        assert float_tokens == torch_greedy(model, ids, NEW_TOKENS)[0]
        assert int4_tokens != float_tokens   # the tiny model is sensitive to the head's rounding
        codes, _ = lm_head_codes(head.float(), "int4")
        model.get_output_embeddings().weight = torch.nn.Parameter(codes.dequantize(), requires_grad=False)
        assert int4_tokens == torch_greedy(model, ids, NEW_TOKENS)[0]


def test_genai_table_gives_the_paired_ratio_on_our_row_only():
    from toolchain.bench.export_genai import genai_table
    row = dict(accuracy_level=0, lm_head="float", bytes=1e6, prefill_ms=10.0, decode_ms_per_token=1.0,
               decode_iqr_ms=0.1, tokens_agree="4/4")
    rows = [{**row, "graph": "toolchain fused", "paired_ratio_prefill": 0.95, "paired_ratio_decode": 1.02,
             "command": "ours"},
            {**row, "graph": "genai builder", "paired_ratio_prefill": 1.0, "paired_ratio_decode": 1.0,
             "command": "theirs"}]
    table = genai_table({"rows": rows, "onnxruntime_genai": "0", "threads": 2, "prompt_tokens": 128,
                         "new_tokens": 64, "rounds": 3, "block_size": 64})
    lines = [line for line in table.splitlines() if line.startswith("| 0 |")]
    assert "0.950, 1.020" in lines[0] and "1.000" not in lines[1]


def test_eval_bench_keeps_other_tasks_rows_of_the_same_items(tmp_path):
    from toolchain.bench.evaluation import LIMIT, SEED, _with_earlier

    stem = tmp_path / "eval_m"
    old = [{"task": "arc_easy", "toolchain_s": 1.0}, {"task": "winogrande", "toolchain_s": 9.0}]
    (tmp_path / "eval_m.json").write_text(json.dumps({"limit": LIMIT, "seed": SEED, "command": "first run",
                                                      "rows": old}))
    fresh = [{"task": "winogrande", "toolchain_s": 5.0}]
    rows, earlier = _with_earlier(stem, fresh, LIMIT)
    assert rows == [old[0], fresh[0]] and earlier == "first run"
    # other items: nothing of the earlier result is kept
    assert _with_earlier(stem, fresh, LIMIT + 1) == (fresh, None)
    assert _with_earlier(tmp_path / "none", fresh, LIMIT) == (fresh, None)


CHILD = """
import pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1])

def stop(signum, frame):
    time.sleep(1.0)    # a cleanup slower than subprocess.run's quarter second of grace
    (here / "cleaned").write_text("yes")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
(here / "ready").write_text("yes")
time.sleep(60)
"""

PARENT = """
import signal, sys
from toolchain.reference_runs import run_command

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
try:
    run_command([sys.executable, sys.argv[1], sys.argv[2]])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_stopped_benchmark_waits_for_its_child_to_clean_up(tmp_path):
    """A benchmark stopped while a job runs in its own process passes the stop on and waits, so the job removes
    its temporary directories (subprocess.run would kill it a quarter second after the interrupt)."""
    import subprocess
    import sys
    import time

    (tmp_path / "child.py").write_text(CHILD)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "child.py"), str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert parent.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    parent.terminate()
    assert parent.wait(timeout=60) == 130
    assert (tmp_path / "cleaned").read_text() == "yes"


def test_a_failing_child_is_an_error():
    import subprocess
    import sys

    from toolchain.reference_runs import run_command

    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_command([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.value.returncode == 3
    run_command([sys.executable, "-c", "pass"])
