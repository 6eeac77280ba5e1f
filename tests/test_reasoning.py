"""The reasoning benchmark: the failure taxonomy's rules on hand-written chains of thought, flips against dense,
Spearman's rank correlation, and the whole bench on a tiny model with a tiny limit."""
from __future__ import annotations

import json

import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.tasks.answers import answer_end
from toolchain.tasks.failures import (CLASSES, arithmetic_slips, classify_failure, flips, ranks, repetition_loop,
                                      runs_on, spearman)
from toolchain.tasks.splits import gsm8k_split

# --- arithmetic slips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "She has 3 + 4 = 7 apples.",
    "He pays 1,200 * 2 = $2,400 in total.",
    "In total, 3 + 4 = 7",                      # the clause comma is not part of the expression
    "Each gets 10 / 3 = 3.33 pies.",            # rounding to the stated decimals
    "(5 + 3) * 2 = 16",
    "5 x 4 = 20 and 6 × 2 = 12 and 8 ÷ 2 = 4",
    "-3 + 5 = 2",
    "3 + 4 = 7 + 1 = 8",                        # a chain: both links hold
    "It costs $5 per day, so 5 * 7 = 35.",
    "1, 2, 3 + 4 = 7",                          # a list before the sum
    "4 * 15 + 2 * 5 = 60 + 10 = 70",            # a chain that rewrites the whole expression
    "$500 - 60 = $500 - 60 = $440",             # a loop restating its left side
    "$2^{3} + 7 = 8 + 7 = 15$",                 # LaTeX: a power, then a rewriting chain
    "$\\frac{1}{2} \\cdot 4 = 2$, and \\(7 \\times 6 = 42\\)",
    "$1{,}000 + 24 = 1{,}024$",
    "$$\\left(\\dfrac{3}{4}\\right)(8) = 6$$",
])
def test_correct_arithmetic_is_no_slip(text):
    assert arithmetic_slips(text) == []


@pytest.mark.parametrize("text, expression, stated, actual", [
    ("3 + 4 = 8", "3 + 4", "8", 7.0),
    ("He has 12 * 3 = 34 marbles.", "12 * 3", "34", 36.0),
    ("She buys 1,500 - 250 = 1,350 tickets.", "1500 - 250", "1,350", 1250.0),
    ("So (5 + 3) * 2 = 15.", "(5 + 3) * 2", "15", 16.0),
    ("5 × 4 = 21", "5 * 4", "21", 20.0),
    ("10 / 3 = 3", "10 / 3", "3", 10 / 3),       # an integer for a fraction is a slip, not rounding
    ("3 + 4 = 7 + 1 = 9", "7 + 1", "9", 8.0),    # the second link of a chain
    ("box 3 + 4 = 9 ok", "3 + 4", "9", 7.0),     # the 'x' of a word is not a multiplication
    ("so $3 + 4 = 8$.", "3 + 4", "8", 7.0),      # inline LaTeX math
    ("12 / 4 = 3 * 2 = 5", "3 * 2", "5", 6.0),   # running on from 3 holds; the second link does not
    # LaTeX read as the arithmetic it writes
    ("$\\frac{7 \\cdot 6 \\cdot 5}{3 \\cdot 4 \\cdot 2} = 35$", "((7  *  6  *  5)/(3  *  4  *  2))", "35", 8.75),
    ("\\[\\tfrac{1}{2} \\times 5 \\times 5 = 25\\]", "((1)/(2))  *  5  *  5", "25", 12.5),
    ("$1 \\cdot 8^7 + 1 = 1048577$", "1  *  8**(7) + 1", "1048577", 8 ** 7 + 1.0),
    ("\\( 2^{10} \\div 4 = 512 \\)", "2**(10)  /  4", "512", 256.0),
    # a right side that goes on as an expression is read whole: 7 * 301, not 14 * 301
    ("$S=\\frac{14}{2}(105+196)=14\\cdot301=4214.$", "((14)/(2))*(105+196)", "14 * 301", 2107.0),
    ("we get $5 \\cdot 6 = 4^2$, which is true", "5  *  6", "4**(2)", 30.0),
    ("It costs $5 and $7 x 2 = 15.", "7 * 2", "15", 14.0),   # two currency signs are not math: x is a times
])
def test_wrong_arithmetic_is_found(text, expression, stated, actual):
    assert arithmetic_slips(text) == [(expression, stated, pytest.approx(actual))]


@pytest.mark.parametrize("text", ["2x + 3 = 7", "50 * 20% = 10", "2 hours * 3 = 6", "12 / 0 = 5", "7 = 7",
                                  "x = 5",
                                  # LaTeX a MATH solution writes: fragments of expressions the checker cannot
                                  # compute, on either side of the "=", are not slips
                                  "(-1)^{1984} (1984 - 2) = -1 + 0",
                                  "= 0 + \\dots + 0 - 1 = -1984",
                                  "$7 \\times 21 + 53 = 147 + 53 = 200$",
                                  "so 31 + 5 = 6^{2}",
                                  "$5x(1-\\frac{1}{5}) = 5x\\cdot\\frac{4}{5} = 4x$",  # in math, x is a variable
                                  "$f(1 + 2) = 7$",                    # a function's argument
                                  "$1 + a \\cdot 1 + 1 = 3$",          # a term of a sum over a variable
                                  "$|1 + z| = \\sqrt{1^2 + 1} = 2$",    # the argument of a command
                                  "$2^{100} - 1 = 7$"])                # an exponent no one works by hand
def test_equations_that_are_not_plain_arithmetic_are_skipped(text):
    assert arithmetic_slips(text) == []


# --- loops and the classes ----------------------------------------------------------------------------------


def test_repetition_loops():
    assert repetition_loop("She has 5 apples. " * 4)
    assert repetition_loop("Step: add the eggs\nStep: add the eggs\nthen\nStep: add the eggs\n")
    assert not repetition_loop("1 + 1 = 2. So 2 + 2 = 4. The answer is 4.")
    assert not repetition_loop("1, 1, 1, 1, 1")   # short repeats are text, not a loop


CHAIN_OK = "Tom has 3 + 4 = 7 apples. He eats 2, so 7 - 2 = 5. The answer is 5."
CUT = "Tom has 3 + 4 = 7 apples. He eats 2, so 7 - 2 ="


@pytest.mark.parametrize("generation, truncated, expected", [
    (CUT, True, "truncation"),                                               # no answer before the cap
    ("Tom has 3 apples and 4 more. " * 5, False, "truncation"),              # a loop without the cap
    ("Tom has 3 + 4 = 7 apples. So he has 7", False, "format"),              # no "The answer is"
    ("Tom has 3 + 4 = 8 apples. The answer: 8.", False, "format"),           # unreadable beats arithmetic
    ("Tom has 3 + 4 = 8 apples. The answer is 8.", False, "arithmetic"),
    (CHAIN_OK, False, "reasoning"),                                          # right sums, wrong path
    # answered, then ran on: judged on the text up to the answer the task scores, not on the run-on
    (CHAIN_OK + " Then 5 + 5 = 11." * 30, True, "reasoning"),
    (CHAIN_OK + " The answer is 5." * 20, False, "reasoning"),
    ("Tom has 3 + 4 = 8 apples. The answer is 8." + " He is 8." * 40, True, "arithmetic"),
    ("Tom has 3 apples and 4 more. " * 4 + "The answer is 7.", False, "truncation"),   # looped, then answered
])
def test_classification_order(generation, truncated, expected):
    assert classify_failure(generation, answer_end("gsm8k", generation), truncated) == expected
    assert expected in CLASSES


def test_a_latex_slip_in_a_math_solution_is_arithmetic():
    final = "\nFinal Answer: The final answer is $4214$. I hope it is correct."
    slipped = "The sum is\n$$S=\\frac{n}{2}(a+l)=\\frac{14}{2}(105+196)=14\\cdot301=4214.$$" + final
    right = "The sum is\n$$S=\\frac{n}{2}(a+l)=\\frac{14}{2}(105+196)=7\\cdot301=2107.$$" + final
    assert classify_failure(slipped, answer_end("math500", slipped)) == "arithmetic"
    assert classify_failure(right, answer_end("math500", right)) == "reasoning"


def test_an_answer_then_a_run_on_is_counted_apart():
    assert runs_on(CHAIN_OK + " The answer is 5." * 20, answer_end("gsm8k", CHAIN_OK), False)   # looping
    assert runs_on(CHAIN_OK + " Next, Ann has 6 + 1 = 7 pears and", len(CHAIN_OK), True)         # to the cap
    assert not runs_on(CHAIN_OK, len(CHAIN_OK), False)                                           # stopped
    assert not runs_on(CUT, None, True)              # no answer: that is truncation, not a run-on


# --- flips and correlation ----------------------------------------------------------------------------------


def test_flips_against_dense():
    dense = {0: True, 1: True, 2: False, 3: False, 4: True}
    other = {0: True, 1: False, 2: True, 3: False, 4: False}
    assert flips(dense, other) == {"right_to_wrong": [1, 4], "wrong_to_right": [2], "both_right": 1,
                                   "both_wrong": 1}
    with pytest.raises(ValueError, match="same items"):
        flips(dense, {0: True})


def test_spearman():
    assert ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)   # scipy.stats.spearmanr
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# --- the benchmark --------------------------------------------------------------------------------------------


def test_reasoning_only_and_options_are_checked(tmp_path):
    from toolchain.bench.reasoning import parse_reasoning_tasks, reasoning_runs
    from toolchain.bench.registry import run_benchmark

    assert [r[0] for r in reasoning_runs(["wanda 2:4", "dense", "gptq 3-bit"])] == ["wanda 2:4", "gptq 3-bit"]
    rows = {r[0]: r for r in reasoning_runs()}
    # the defaults' re-check: Barber against the init it starts from, at the same sparsity
    assert rows["barber(wanda) 50%"][2:5] == ("barber", "0.5", "wanda") and rows["wanda 50%"][2:5] == ("wanda", "0.5", None)
    assert rows["barber grad-rms 2:4"][5] == ["--rebuild-score", "grad-rms"]
    assert rows["barber alpha=0.05 2:4"][5] == ["--rebuild-ratio", "0.05"]
    with pytest.raises(ConfigError, match="'gptq 5-bit'"):
        reasoning_runs(["gptq 5-bit"])
    with pytest.raises(ConfigError, match="'mmlu'"):
        parse_reasoning_tasks("gsm8k,mmlu")
    with pytest.raises(ConfigError, match="--max-gen-toks must be positive"):
        run_benchmark("reasoning", str(tmp_path / "no-model"), tmp_path / "out", max_gen_toks=0)
    with pytest.raises(ConfigError, match="bench quant takes no --limit"):
        run_benchmark("quant", str(tmp_path / "no-model"), tmp_path / "out", limit=3)
    assert not (tmp_path / "out").exists()


def test_every_reasoning_row_is_a_valid_command(tmp_path):
    """Each row's command line parses and passes its job's validation, so a mistyped or inapplicable flag in a
    row fails here, not an hour into a benchmark run."""
    from toolchain.bench.reasoning import REASONING_CONFIGS
    from toolchain.cli import build_parser
    from toolchain.jobs.config import PruneConfig, QuantConfig
    from toolchain.jobs.options import config_from_args
    from toolchain.reference_runs import prune_command, quantize_command

    parser = build_parser()
    for name, command, method, value, init, extra in REASONING_CONFIGS:
        if command == "recover":
            continue
        cmd = (prune_command(tmp_path, tmp_path / "out", method, init, value, extra) if command == "prune"
               else quantize_command(tmp_path, tmp_path / "out", method, value, extra))
        args = parser.parse_args(cmd[3:])
        cfg, given = config_from_args(PruneConfig if command == "prune" else QuantConfig, args)
        cfg.validate(given)


def test_bench_on_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Dense, RTN 4-bit, Wanda 2:4, GPTQ 3-bit and its recovery on 3 GSM8K items and 2 items per zero-shot task.
    A run stopped by a failing compression keeps the rows it finished; a later run adds its rows; every row is
    measured on held-out GSM8K items, every wrong answer classified, and the flips agree with the per-item
    scores."""
    from toolchain import reference_runs
    from toolchain.bench import reasoning
    from toolchain.cli import main

    def in_process(cmd):
        # `python -m toolchain.cli ARGS` without a new interpreter: the same command, a fast test
        assert cmd[1:3] == ["-m", "toolchain.cli"] and main(cmd[3:]) == 0

    monkeypatch.setattr(reference_runs, "run_command", in_process)
    out = tmp_path / "bench"
    options = dict(limit=3, zero_shot_limit=2, max_gen_toks=6, tasks="gsm8k,zero-shot", ppl_windows=2,
                   calib_samples=4, seqlen=64)
    stem = out / f"reasoning_{tiny_llama_dir.name}"
    real_prune = reasoning.prune_in_subprocess

    def broken(*args, **kwargs):
        raise RuntimeError("stopped")

    monkeypatch.setattr(reasoning, "prune_in_subprocess", broken)
    with pytest.raises(RuntimeError, match="stopped"):
        reasoning.run_reasoning_bench(str(tiny_llama_dir), out, only=["dense", "rtn 4-bit", "wanda 2:4"], **options)
    assert [r["name"] for r in json.loads(stem.with_suffix(".json").read_text())["rows"]] == ["dense", "rtn 4-bit"]
    monkeypatch.setattr(reasoning, "prune_in_subprocess", real_prune)
    monkeypatch.setattr(reasoning, "REASONING_CONFIGS", [
        (*c[:5], ["--examples", "8", "--steps", "3", "--batch-size", "2"]) if c[1] == "recover" else c
        for c in reasoning.REASONING_CONFIGS])
    capsys.readouterr()
    result = reasoning.run_reasoning_bench(str(tiny_llama_dir), out,
                                           only=["wanda 2:4", "gptq 3-bit", "gptq 3-bit recovered"], **options)
    # the recovery starts from the GPTQ row's directory, quantized once
    assert capsys.readouterr().out.count("reusing") == 1

    saved = json.loads(stem.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["dense", "rtn 4-bit", "gptq 3-bit", "wanda 2:4",
                                                  "gptq 3-bit recovered"]
    assert saved["rows"] == result["rows"]
    recovered = saved["rows"][-1]
    assert recovered["recovered_from"] == "gptq 3-bit" and recovered["recover_steps"] == 3
    assert recovered["command"].startswith("toolchain recover --model <gptq 3-bit output> --out OUT")
    heldout = set(gsm8k_split()[1])
    for row in saved["rows"]:
        task = row["tasks"]["gsm8k"]
        assert task["items"] == 3 and set(row["ppl"]) == {"pydoc", "wiki", "science"}
        assert row["threads"] == torch.get_num_threads()
        wrong = [k for k, ok in task["correct"].items() if not ok]
        assert sorted(task["failures"]) == sorted(wrong)
        assert sum(task["taxonomy"].values()) == len(wrong)
        # six tokens cannot hold a chain of thought: a wrong answer is cut off or unreadable
        assert set(task["failures"].values()) <= {"truncation", "format"}
        assert set(task["ran_on"]) <= {int(k) for k in task["correct"]}
        assert task["accuracy"] == pytest.approx(sum(task["correct"].values()) / 3)
        assert len(row["zero_shot"]["tasks"]) == 8 and 0 <= row["zero_shot"]["average"] <= 1
        samples = (stem / reasoning.slug(row["name"]) / "samples_gsm8k.jsonl").read_text().splitlines()
        assert [json.loads(s)["doc_id"] for s in samples] == sorted(int(k) for k in task["correct"])
        assert {int(k) for k in task["correct"]} <= heldout
    dense = saved["rows"][0]["tasks"]["gsm8k"]["correct"]
    for row in saved["rows"][1:]:
        f = saved["analysis"]["flips"][row["name"]]["gsm8k"]
        mine = row["tasks"]["gsm8k"]["correct"]
        assert f["right_to_wrong"] == sorted(int(k) for k in dense if dense[k] and not mine[k])
        assert f["wrong_to_right"] == sorted(int(k) for k in dense if not dense[k] and mine[k])
    assert set(saved["analysis"]["spearman"]) == {f"{m} vs ppl {t}" for m in ("gsm8k", "zero-shot")
                                                  for t in ("pydoc", "wiki", "science")}
    table = stem.with_suffix(".md").read_text()
    assert "| wanda 2:4 |" in table and "Spearman" in table
    assert "gptq 3-bit recovered: `toolchain recover` of the gptq 3-bit row, 3 steps" in table
    assert "GSM8K's from its held-out half" in table and "per zero-shot task" in table
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the stored generations classify again to the same result (bench/scripts/reclassify_reasoning.py), and a
    # samples file that does not score as its row did is refused before anything is written
    import importlib.util
    from pathlib import Path

    from toolchain.errors import ToolchainError

    script = Path(reasoning.__file__).parent / "scripts" / "reclassify_reasoning.py"
    spec = importlib.util.spec_from_file_location("reclassify_reasoning", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = json.loads(stem.with_suffix(".json").read_text())
    for row in stale["rows"]:           # classes from other rules: the generations, not the file, decide them
        task = row["tasks"]["gsm8k"]
        task.update(failures={k: "reasoning" for k in task["failures"]}, ran_on=[-1],
                    taxonomy={c: 0 for c in CLASSES})
    stem.with_suffix(".json").write_text(json.dumps(stale))
    again = module.reclassify(str(tiny_llama_dir), out)
    assert again["rows"] == saved["rows"] and json.loads(stem.with_suffix(".json").read_text()) == again
    samples = stem / reasoning.slug("wanda 2:4") / "samples_gsm8k.jsonl"
    first, *rest = samples.read_text().splitlines()
    item = json.loads(first)
    item["exact_match,strict-match"] = 1.0 - item["exact_match,strict-match"]
    samples.write_text("\n".join([json.dumps(item), *rest]) + "\n")
    before = stem.with_suffix(".json").read_text()
    with pytest.raises(ToolchainError, match="correctness differs"):
        module.reclassify(str(tiny_llama_dir), out)
    assert stem.with_suffix(".json").read_text() == before
    samples.unlink()
    with pytest.raises(ToolchainError, match="samples_gsm8k.jsonl is missing"):
        module.reclassify(str(tiny_llama_dir), out)
    assert stem.with_suffix(".json").read_text() == before


def _row(name, ppl, gsm8k=None, zero_shot=None):
    """A measured row as the bench writes it: perplexities, and GSM8K items right (True) or wrong."""
    row = {"name": name, "ppl": {"pydoc": ppl, "wiki": 2 * ppl}, "tasks": {}}
    if gsm8k is not None:
        row["tasks"]["gsm8k"] = {"metric": "exact_match,strict-match", "accuracy": sum(gsm8k) / len(gsm8k),
                                 "stderr": 0.1, "items": len(gsm8k),
                                 "correct": {str(i): ok for i, ok in enumerate(gsm8k)},
                                 "failures": {str(i): "reasoning" for i, ok in enumerate(gsm8k) if not ok},
                                 "taxonomy": {c: (c == "reasoning") * gsm8k.count(False) for c in CLASSES},
                                 "ran_on": [0]}
    if zero_shot is not None:
        row["zero_shot"] = {"average": zero_shot, "tasks": {}}
    return row


def test_a_run_on_other_tasks_adds_columns_to_the_earlier_table(tmp_path, capsys):
    """`--tasks zero-shot` after a GSM8K run: rows keep their GSM8K scores, gain the zero-shot average, and rows
    measured by only one run show '-' in the other's columns; a task measured with other settings, or rows with
    other perplexity windows, are dropped rather than compared."""
    from toolchain.bench.reasoning import _merged, analyse, reasoning_table

    stem = tmp_path / "reasoning_m"
    shared = {"seed": 0, "ppl_windows": 8, "seqlen": 512, "max_gen_toks": 256}
    gsm8k_run = {**shared, "tasks": ["gsm8k"], "limit": 4, "zero_shot_limit": 50, "gsm8k_pool": "held out"}
    stem.with_suffix(".json").write_text(json.dumps({
        "command": "bench --tasks gsm8k", "settings": gsm8k_run,
        "rows": [_row("dense", 10.0, gsm8k=[True, True, False, False]),
                 _row("gptq 3-bit", 12.0, gsm8k=[True, False, False, False])]}))
    zero_shot_run = {**shared, "tasks": ["zero-shot"], "limit": 50, "zero_shot_limit": 20}
    rows, settings, commands = _merged(stem, [_row("dense", 10.0, zero_shot=0.5),
                                              _row("wanda 2:4", 15.0, zero_shot=0.4)], zero_shot_run)
    assert settings["tasks"] == ["gsm8k", "zero-shot"] and commands == ["bench --tasks gsm8k"]
    # the GSM8K columns keep the settings they were measured with
    assert settings["limit"] == 4 and settings["gsm8k_pool"] == "held out" and settings["zero_shot_limit"] == 20
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["dense", "gptq 3-bit", "wanda 2:4"]
    assert by_name["dense"]["tasks"]["gsm8k"]["accuracy"] == 0.5 and by_name["dense"]["zero_shot"]["average"] == 0.5
    assert "zero_shot" not in by_name["gptq 3-bit"] and "gsm8k" not in by_name["wanda 2:4"]["tasks"]
    analysis = analyse(rows, tuple(settings["tasks"]))
    assert analysis["flips"]["gptq 3-bit"]["gsm8k"]["right_to_wrong"] == [1]
    assert analysis["flips"]["wanda 2:4"] == {}
    assert analysis["spearman"]["gsm8k vs ppl wiki"]["rows"] == 1
    assert analysis["spearman"]["zero-shot vs ppl wiki"]["rows"] == 1
    table = reasoning_table({"command": "bench --tasks zero-shot", "commands": [*commands, "bench --tasks zero-shot"],
                             "model": "m", "calibration": "c", "settings": settings, "rows": rows,
                             "analysis": analysis})
    assert "| gptq 3-bit | 12.00 | 24.00 | 0.250 ± 0.100 | 1 / 0 | 0/0/0/3 | 1 | - |" in table
    assert "| wanda 2:4 | 15.00 | 30.00 | - | - | - | - | 0.400 |" in table
    assert "`bench --tasks gsm8k`" in table and "`bench --tasks zero-shot`" in table

    # GSM8K again with another limit: the rows not measured again lose their GSM8K scores
    stem.with_suffix(".json").write_text(json.dumps({"commands": commands, "settings": settings, "rows": rows}))
    rows2, settings2, _ = _merged(stem, [_row("dense", 10.0, gsm8k=[True, False])],
                                  {**shared, "tasks": ["gsm8k"], "limit": 2, "zero_shot_limit": 50,
                                   "gsm8k_pool": "held out"})
    assert "dropped" in capsys.readouterr().out
    assert settings2["tasks"] == ["gsm8k", "zero-shot"] and settings2["zero_shot_limit"] == 20
    by_name = {r["name"]: r for r in rows2}
    assert by_name["dense"]["tasks"]["gsm8k"]["items"] == 2 and by_name["dense"]["zero_shot"]["average"] == 0.5
    assert by_name["gptq 3-bit"]["tasks"] == {} and by_name["wanda 2:4"]["zero_shot"]["average"] == 0.4

    # other perplexity windows: nothing earlier is comparable
    rows3, settings3, commands3 = _merged(stem, [_row("dense", 9.0, zero_shot=0.5)],
                                          {**zero_shot_run, "ppl_windows": 16})
    assert [r["name"] for r in rows3] == ["dense"] and settings3["tasks"] == ["zero-shot"] and commands3 == []

    # the same rows again with another cap on their only task: nothing the earlier commands measured is left
    earlier = {**shared, "tasks": ["gsm8k"], "limit": 2, "zero_shot_limit": 50, "gsm8k_pool": "held out"}
    stem.with_suffix(".json").write_text(json.dumps({"commands": ["bench --limit 20"], "settings": earlier,
                                                     "rows": [_row("dense", 10.0, gsm8k=[True, False])]}))
    _, _, commands4 = _merged(stem, [_row("dense", 10.0, gsm8k=[True, False, True])],
                              {**shared, "tasks": ["gsm8k"], "limit": 3, "zero_shot_limit": 50, "gsm8k_pool": "held out"})
    assert commands4 == []


def test_answer_end_is_where_the_scored_answer_ends():
    """The first strict match, the one lm-eval scores; for MATH the same regex and appended ending as lm-eval's
    Minerva extraction, so the two agree on whether there is an answer."""
    from lm_eval.tasks.minerva_math.utils import get_unnormalized_answer

    text = "3 + 4 = 7. The answer is 7. Then 7 + 1 = 8. The answer is 8."
    # lm-eval's strict pattern ends in "." (any character): here the space after the number's own period
    assert text[:answer_end("gsm8k", text)] == "3 + 4 = 7. The answer is 7. "
    assert answer_end("gsm8k", "3 + 4 = 7, so Tom has 7 apples.") is None
    assert answer_end("gsm8k", "The answer is $7.") is None      # strict: no dollar sign before the number
    done = "So x = 5.\nFinal Answer: The final answer is $5$. I hope it is correct."
    cut = "So x = 5.\nFinal Answer: The final answer is $5$. "  # cut before "I hope it is correct.": still read
    for generation, expected in [(done + "\nHuman: and 2 + 2?", done), (cut, cut)]:
        assert generation[:answer_end("math500", generation)] == expected
        assert get_unnormalized_answer(generation) == "$5$"
    assert answer_end("math500", "So the answer is $\\boxed{5}$.") is None
    assert get_unnormalized_answer("So the answer is $\\boxed{5}$.") == "[invalidanswer]"
    assert answer_end("math500", "Final Answer: The final answer is $5$") is None   # nor does lm-eval read it
    assert get_unnormalized_answer("Final Answer: The final answer is $5$") == "[invalidanswer]"
    with pytest.raises(ValueError, match="no answer extraction"):
        answer_end("arc_easy", "A")


