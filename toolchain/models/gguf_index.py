"""A GGUF file read tensor by tensor for streaming: each tensor is dequantized only when asked for.

transformers loads a GGUF by dequantizing every tensor into one float32 state dict (`load_gguf_checkpoint`).
Streaming reads the same tensors the same way, one at a time: gguf-py's memory-mapped `GGUFReader`, its
`dequantize`, and transformers' own name map and per-architecture processing (llama's q/k row permutation
undone), so each tensor equals the one a whole load gives, bit for bit.

`GGUFIndex` has `CheckpointIndex`'s interface (`files`, `in`, `dtype`, `tensor`, `release`), so
`StreamingCheckpoint` streams a GGUF as it streams safetensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError

#: architectures whose transformers tensor processor keeps GGUF tensor names (it only transforms the values),
#: so the name map is known before any tensor is dequantized
STREAMED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def gguf_tensor_elements(path: str | Path) -> int:
    """How many elements the GGUF's tensors hold (read from the tensor infos; nothing is dequantized)."""
    from gguf import GGUFReader

    try:
        return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF {path}: {exc}") from None


class GGUFIndex:
    """Transformers tensor name -> the GGUF tensor it is made from, dequantized to float32 when asked for."""

    def __init__(self, path: str | Path, model: torch.nn.Module):
        """`model`: the meta-device skeleton, whose parameter names the GGUF names are mapped to."""
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

        self.path = Path(path)
        self.directory = self.path   # named in error messages, as a checkpoint directory is
        self._reader = None
        parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)   # metadata only
        arch = read_field(self._open(), "general.architecture")[0]
        if arch not in STREAMED_ARCHITECTURES:
            raise ModelLoadError(f"streaming a GGUF supports the {', '.join(STREAMED_ARCHITECTURES)} architectures; "
                                 f"{self.path} is {arch!r}: use --no-streaming (the GGUF is then dequantized whole)")
        self._config = parsed["config"]
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self._config)
        self._map = get_gguf_hf_weights_map(model, self._processor)
        self.files: dict[str, int] = {}   # transformers name -> index of the GGUF tensor
        for i, t in enumerate(self._open().tensors):
            if t.name in self._map:
                self.files[self._map[t.name]] = i
        self.release()

    def _open(self):
        from gguf import GGUFReader

        if self._reader is None:
            try:
                self._reader = GGUFReader(str(self.path))
            except Exception as exc:
                raise ModelLoadError(f"cannot read GGUF {self.path}: {exc}") from None
        return self._reader

    def release(self) -> None:
        """Drop the memory map: the pages read so far leave the resident set (as `CheckpointIndex.release`)."""
        self._reader = None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32   # a GGUF is dequantized to float32 (what a whole load gives)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, dequantized and processed as transformers' GGUF load does, float32."""
        from gguf import dequantize

        if name not in self.files:
            raise ModelLoadError(f"the GGUF {self.path} has no tensor for {name}")
        t = self._open().tensors[self.files[name]]
        try:
            weights = dequantize(t.data, t.tensor_type)
            result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._map,
                                             parsed_parameters={"config": self._config, "tensors": {}})
        except Exception as exc:
            raise ModelLoadError(f"cannot dequantize {t.name} of {self.path}: {exc}") from None
        if result.name != t.name:
            raise ModelLoadError(f"{self.path}: transformers renames {t.name} to {result.name} while loading; "
                                 f"this GGUF cannot be streamed: use --no-streaming")
        return torch.from_numpy(np.copy(result.weights))
