"""Stream a safetensors checkpoint: the model skeleton lives on the meta device and each decoder layer's
tensors are read, memory-mapped, only when asked for, so only the layers being processed hold float32 memory.

`StreamingCheckpoint(directory)` checks every shard (present, readable header, not truncated) before anything
is built, loads what lies outside the decoder layers once (embeddings, final norm, head, rotary tables), and
leaves every decoder layer on `meta` until `load_layer(i)`; `free_layer(i)` returns it to `meta`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..machine import release_free_memory
from . import adapter_for
from .loading import check_safetensors, gguf_file
from .shards import DTYPES_BY_CODE as STORED_DTYPES, INDEX


class CheckpointIndex:
    """Tensor name -> shard file of an HF safetensors checkpoint, sharded (with its index) or not; every file
    is checked before the first tensor is read, so a bad checkpoint is named before any output exists."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        index_path = self.directory / INDEX
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"corrupt shard index {index_path}: {exc}") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise ModelLoadError(f"{index_path} names the shard {shard}, which is missing from "
                                         f"{self.directory}")
            self.files = {name: self.directory / shard for name, shard in weight_map.items()}
        check_safetensors(self.directory)
        if not index_path.is_file():
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise ModelLoadError(f"{self.directory} has no *.safetensors weights to stream")
            self.files = {}
            for shard in shards:
                for name in self._handle(shard).keys():
                    self.files[name] = shard

    def _handle(self, shard: Path):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard]

    def release(self) -> None:
        """Close every memory map: the pages read so far leave this process's resident set (they stay in the
        page cache), so peak RSS does not grow with the number of layers streamed."""
        self._handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def dtype(self, name: str) -> torch.dtype:
        return STORED_DTYPES[self._handle(self.files[name]).get_slice(name).get_dtype()]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored (memory-mapped; the caller converts)."""
        if name not in self.files:
            raise ModelLoadError(f"the checkpoint in {self.directory} has no tensor {name}")
        return self._handle(self.files[name]).get_tensor(name)


class StreamingCheckpoint:
    """A float32 model whose decoder layers stay on `meta` until loaded one at a time."""

    def __init__(self, directory: str | Path, with_head: bool = True):
        """`directory`: a Hugging Face safetensors directory, or a GGUF (a `.gguf` file or a named model), whose
        tensors are then dequantized one at a time (`gguf_index.GGUFIndex`). `with_head=False` leaves an untied
        LM head on `meta`: the layer-by-layer jobs never run it (the writer copies it from the checkpoint), and
        in float32 it is as large as the embeddings."""
        from transformers import AutoConfig, AutoModelForCausalLM

        gguf = gguf_file(directory)
        if gguf is not None:
            try:
                config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            except Exception as exc:
                raise ModelLoadError(f"could not read GGUF {gguf}: {exc}") from None
            fields = config.to_dict()
            fields.pop("quantization_config", None)   # a plain float model, as loading.py's _plain_copy makes
            config = type(config).from_dict(fields)
        else:
            directory = Path(directory)
            if not (directory / "config.json").is_file():
                raise ModelLoadError(f"{directory} has no config.json; expected a Hugging Face model directory")
            config = AutoConfig.from_pretrained(directory)
        adapter_for(config)
        if gguf is None:
            self.index = CheckpointIndex(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if gguf is not None:
            from .gguf_index import GGUFIndex

            self.index = GGUFIndex(gguf, model)
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers(model)
        self.layers_path = next(name for name, m in model.named_modules() if m is self.layers)
        self.with_head = with_head
        head = model.get_output_embeddings()
        self._skip = set() if with_head or head is None or model.config.tie_word_embeddings else {
            f"{name}.{p}" for name, m in model.named_modules() if m is head for p, _ in head.named_parameters()}
        self.outside_index = self.index   # what lies outside the layers is always read from the input
        self._load_outside_layers()
        self.index.release()

    def _inside(self) -> set[int]:
        return {id(t) for t in list(self.layers.parameters()) + list(self.layers.buffers())}

    def _load_outside_layers(self) -> None:
        model, inside = self.model, self._inside()
        # Tables a module computes at construction and never saves (rotary inverse frequencies): rebuild the
        # module on the CPU from the config, as loading from the checkpoint would have built it.
        for name, module in list(model.named_modules()):
            if module._non_persistent_buffers_set and not any(id(b) in inside for b in module.buffers()):
                parent_name, _, child = name.rpartition(".")
                try:
                    rebuilt = type(module)(config=model.config)
                except Exception as exc:
                    raise ModelLoadError(f"streaming cannot rebuild {name} ({type(module).__name__}): {exc}") from None
                setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
        tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if id(tensor) in inside or tensor.device.type != "meta" or name in self._skip:
                continue
            if name not in self.index:
                if name in tied:
                    continue
                raise ModelLoadError(f"the checkpoint in {self.index.directory} has no tensor {name}")
            self._assign(model, name, self.index.tensor(name))
        if tied:
            model.tie_weights()

    @staticmethod
    def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        value = value.to(torch.float32)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
        else:
            owner._buffers[attr] = value

    def _embedding_names(self) -> list[str]:
        embedding = self.model.get_input_embeddings()
        prefix = next(name for name, m in self.model.named_modules() if m is embedding)
        return [f"{prefix}.{name}" for name, _ in embedding.named_parameters()]

    def release_embeddings(self) -> None:
        """Return the input embedding table to `meta` once the walk has embedded its windows, where no LM head
        runs (`with_head=False`). In float32 it is the largest tensor outside the decoder layers (V x d: 0.8 GB
        at a 49k vocabulary and width 4096, 2.1 GB for Llama-3's 128k), and a layer-by-layer job needs it only
        to make the first layer's inputs. The output writer reads it from the checkpoint, not from here."""
        if not self.with_head:
            self.model.get_input_embeddings().to("meta")

    def load_embeddings(self) -> None:
        """Read the input embedding table back from the checkpoint if `release_embeddings` dropped it."""
        embedding = self.model.get_input_embeddings()
        if not any(p.is_meta for p in embedding.parameters()):
            return
        for name in self._embedding_names():
            self._assign(self.model, name, self.outside_index.tensor(name))
        self.outside_index.release()
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer `i` with its tensors read from the checkpoint, in float32 on the CPU."""
        layer = self.layers[i]
        prefix = f"{self.layers_path}.{i}."
        for name, _ in list(layer.named_parameters()) + list(layer.named_buffers()):
            self._assign(layer, name, self.index.tensor(prefix + name))
        self.index.release()   # the stored copy's pages leave the resident set now that the layer is float32
        return layer

    def free_layer(self, i: int) -> None:
        """Return decoder layer `i` to `meta`, releasing its memory (and the checkpoint's memory maps), and hand
        the freed heap pages back to the kernel (`machine.release_free_memory`), so a walk's resident set does not
        grow with the number of layers."""
        self.layers[i].to("meta")
        self.index.release()
        release_free_memory()

    def layer_state(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Decoder layer `i`'s tensors under their checkpoint names, as `save_pretrained` would write them."""
        return {f"{self.layers_path}.{i}.{name}": t for name, t in layer.state_dict().items()}

    def outside_names(self) -> list[str]:
        """The checkpoint names outside the decoder layers that `save_pretrained` writes (a tied head is not
        written: it is the embedding table)."""
        model = self.model
        tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
        return [n for n in model.state_dict() if not n.startswith(self.layers_path + ".") and n not in tied]

    def outside_tensor(self, name: str) -> torch.Tensor:
        """A tensor outside the decoder layers as a loaded model holds it (float32), read from the checkpoint."""
        return self.outside_index.tensor(name).to(torch.float32)

    def switch_to(self, directory: str | Path) -> None:
        """Read the decoder layers from now on from `directory` (the float32 shards a first pass wrote); what
        lies outside the layers is still read from the input (`outside_index`)."""
        self.index.release()
        self.index = CheckpointIndex(directory)

    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's dtype for the decoder weights (what a streamed output keeps by default)."""
        first = next(n for n in self.index.files if n.startswith(self.layers_path + "."))
        return self.index.dtype(first)
