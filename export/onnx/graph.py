"""The graph under construction: nodes, initializers and cached constants with unique names, and the
decoder's dimensions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OPSET = 21
MS_DOMAIN = "com.microsoft"


@dataclass
class Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    #: (query heads, KV heads) of each layer, read from its projections' shapes: structured pruning makes
    #: layers differ, so the config's head counts are only the widest layer's
    layer_heads: tuple[tuple[int, int], ...] = ()


class Graph:
    """Nodes, initializers and cached constants, with unique names. With `data` (an `external.ExternalData`)
    each initializer's bytes go to the external-data file as it is made, and the graph keeps a reference."""

    def __init__(self, data=None):
        self.nodes, self.initializers, self._consts, self._count = [], [], {}, 0
        self.data = data

    def _add(self, tensor) -> None:
        self.initializers.append(self.data.take(tensor) if self.data is not None else tensor)

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        from onnx import helper

        outs = outputs if isinstance(outputs, list) else [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"{hint or op_type}/node"),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        external = self.data.array(name, array) if self.data is not None and array.dtype.kind in "fiub" else None
        if external is not None:   # streamed: the bytes went to the data file, block by block
            self.initializers.append(external)
        else:
            self._add(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_raw(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        from onnx import helper

        self._add(helper.make_tensor(name, data_type, dims, raw, raw=True))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.name("const"), arr)
        return self._consts[key]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a parameter or tensor."""
    return t.detach().to(torch.float32).cpu().numpy()
