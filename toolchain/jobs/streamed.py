"""Streamed jobs: the input is never materialised and the output is written as the walk makes it.

`open_streamed` opens a Hugging Face safetensors checkpoint as a meta-device skeleton (`StreamingCheckpoint`:
the layer engine loads each decoder layer when it reaches it). `StreamedOutput` is the output side: a temporary
directory beside --out into which each decoder layer's final tensors go as HF shards (`ShardWriter`, in the
output dtype) the moment the walk is done with the layer; embeddings, final norm and head are copied from the
checkpoint once, at the start. `commit` adds the config, tokenizer, compression.json and quant_state.safetensors
and renames the directory to --out; any failure or interrupt removes it (`abort`), so --out never holds a
half-written model.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_dir
from ..models import LoadedModel
from ..models.loading import model_source
from ..models.shards import DEFAULT_SHARD_BYTES, ShardWriter
from ..models.streaming import StreamingCheckpoint
from ..quant import QuantizedWeight, write_quant_state
from ..quant.state import merge_quant_state

SHARD_BYTES = DEFAULT_SHARD_BYTES    # the output's shard size (the tests make it small to get many shards)


def open_streamed(model_dir: str | Path, with_head: bool = False) -> LoadedModel:
    """The model as a skeleton whose decoder layers stay on `meta`, with its tokenizer (`with_head`: an untied LM
    head is loaded too, for a job that runs it)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path, source = model_source(model_dir)
    stream = StreamingCheckpoint(path, with_head=with_head)
    try:
        tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if path.is_file()
                     else AutoTokenizer.from_pretrained(path))
    except Exception:
        tokenizer = None
    return LoadedModel(model=stream.model, tokenizer=tokenizer, adapter=stream.adapter, source=source, stream=stream)


class StreamedOutput:
    """Where a streamed job writes. Every rank gets a scratch directory (a first pass's float32 layers, the
    per-layer quantization state); the writing rank (`writer`) also builds the output directory."""

    def __init__(self, stream: StreamingCheckpoint, out: str | Path, dtype: torch.dtype, writer: bool = True):
        self.stream, self.dtype, self.writer = stream, dtype, writer
        self.out = Path(out).resolve()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.scratch-", dir=self.out.parent))
        self._stack = contextlib.ExitStack()
        self._quant_parts: list[Path] = []
        self.shards: ShardWriter | None = None
        try:
            if writer:
                self.tmp = self._stack.enter_context(atomic_dir(self.out))
                self.shards = ShardWriter(self.tmp, dtype, SHARD_BYTES)
                for name in stream.outside_names():   # one at a time: only one float32 table is ever added
                    self.shards.add({name: stream.outside_tensor(name)})
                stream.index.release()
        except BaseException as exc:
            self.abort(exc)
            raise
        self.target = self.shards     # where the walk's layers go (a first pass of compress swaps this)

    def sink(self, i: int, layer: torch.nn.Module) -> None:
        """The engine's sink: decoder layer `i` is final; write its tensors."""
        if self.target is not None:
            self.target.add(self.stream.layer_state(i, layer))

    def spill_quant_state(self, i: int, state: dict[str, QuantizedWeight]) -> None:
        """Write layer `i`'s quantization state to a part file and leave only shapes (on `meta`) in `state`."""
        if self.writer:
            part = self.scratch / f"quant_state-{i:05d}.safetensors"
            write_quant_state(part, state)
            self._quant_parts.append(part)
        for name, qw in state.items():
            state[name] = QuantizedWeight(qw.codes.to("meta"), qw.scales.to("meta"), qw.zeros.to("meta"), qw.spec,
                                          None)

    def write_quant_state(self, path: Path) -> None:
        merge_quant_state(self._quant_parts, path, consume=True)   # the parts are scratch

    @contextlib.contextmanager
    def first_pass(self):
        """compress: the pruning walk's layers go to float32 shards in the scratch directory, and the
        quantization walk then streams them back, as the in-memory path keeps the pruned float32 model."""
        pruned = ShardWriter(self.scratch / "pruned-float32", torch.float32)
        final, self.target = self.target, pruned
        try:
            yield
        finally:
            self.target = final
        self.stream.switch_to(pruned.close())

    def commit(self, loaded: LoadedModel, extra_json: dict[str, dict] | None = None,
               extra_files: dict[str, Callable[[Path], None]] | None = None) -> Path:
        """Finish the output directory and rename it to --out (the writing rank)."""
        import json

        try:
            self.shards.close()
            config = copy.deepcopy(loaded.model.config)
            config.architectures = [type(loaded.model).__name__]
            config.dtype = self.dtype
            config.save_pretrained(self.tmp)
            if loaded.model.can_generate() and loaded.model.generation_config is not None:
                loaded.model.generation_config.save_pretrained(self.tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(self.tmp)
            for name, payload in (extra_json or {}).items():
                (self.tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
            for name, write in (extra_files or {}).items():
                write(self.tmp / name)
        except BaseException as exc:
            self.abort(exc)
            raise
        self._stack.close()          # the rename
        self.discard_scratch()
        return self.out

    def abort(self, exc: BaseException) -> None:
        """Remove everything this run wrote (the temporary output directory and the scratch)."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)
        self.discard_scratch()

    def discard_scratch(self) -> None:
        self.stream.index.release()
        shutil.rmtree(self.scratch, ignore_errors=True)
