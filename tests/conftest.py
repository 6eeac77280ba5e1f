"""Tiny random models of both supported families, built here (nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in a blink on CPython's docs, wrapped for transformers."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [topics[k] for k in sorted(topics)[:20]]
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_qwen2(vocab_size: int, seed: int = 0, layers: int = 2):
    """Qwen2's shape of a LLaMA decoder: q/k/v with biases (made non-zero here, so a dropped bias shows), an
    untied LM head, grouped-query attention and Qwen's RoPE base."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=False, rope_theta=1_000_000.0, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def make_opt(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                    vocab_size=vocab_size, max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


VOCAB = 320


def tiny_loaded(family: str = "llama", seed: int = 0, layers: int = 2):
    """A tiny random model of `family` wrapped as the loader would return it (no tokenizer)."""
    from toolchain.models import adapter_for
    from toolchain.models.loading import LoadedModel

    make = {"llama": make_llama, "qwen2": make_qwen2, "opt": make_opt}[family]
    model = make(VOCAB, seed, layers)
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source={})


def random_ids(n: int = 8, t: int = 32, seed: int = 0) -> torch.Tensor:
    """Seeded random token windows [n, t] for the tiny models."""
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_qwen2(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-opt")
    make_opt(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=["llama", "opt"])
def tiny_dir(request, tiny_llama_dir, tiny_opt_dir):
    return tiny_llama_dir if request.param == "llama" else tiny_opt_dir


@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory, tiny_llama_dir, tiny_opt_dir, tiny_qwen2_dir):
    """Factory of compressed tiny models (HF dir + quant_state.safetensors + compression.json), made once per
    (family, sparsity, bits, group_size, asym) for the session: `compressed_dir("llama", "2:4", 4)`."""
    from toolchain.jobs.config import PruneConfig, QuantConfig
    from toolchain.jobs.prune import run_prune
    from toolchain.jobs.quantize import run_compress, run_quantize

    made: dict[tuple, object] = {}
    calib = dict(calib_samples=8, seqlen=32, seed=0)

    def make(family: str = "llama", sparsity: str | None = "2:4", bits="4", group_size: int = 32,
             asym: bool = False, method: str = "gptq"):
        key = (family, sparsity, str(bits), group_size, asym, method)
        if key not in made:
            src = str({"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "opt": tiny_opt_dir}[family])
            out = tmp_path_factory.mktemp("compressed") / "model"
            qcfg = QuantConfig(method=method, bits=bits, group_size=group_size, asym=asym, **calib)
            if bits is None:
                run_prune(src, out, PruneConfig(method="sparsegpt", sparsity=sparsity, **calib), progress=False)
            elif sparsity is None:
                run_quantize(src, out, qcfg, progress=False)
            else:
                run_compress(src, out, PruneConfig(method="sparsegpt", sparsity=sparsity, **calib), qcfg,
                             progress=False)
            made[key] = out
        return made[key]

    return make
