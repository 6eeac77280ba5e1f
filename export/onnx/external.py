"""The ONNX external-data file written tensor by tensor, as the graph builder makes each initializer.

A streamed export never holds the graph's weights: each initializer's bytes go to `<model>.onnx.data` the moment
the builder makes them, and the TensorProto that stays in the graph keeps only its name, type, shape and where
its bytes are (`data_location` EXTERNAL with `location`, `offset`, `length`). The `.onnx` file then holds the
graph structure and the small tensors, so a graph of any size is valid (protobuf's 2 GiB cap applies to the
structure only) and `onnx.checker.check_model(path)` and onnxruntime read it by path.

The layout follows onnx's own writers: a tensor goes to the file when its raw bytes reach `SIZE_THRESHOLD`
(measured as `onnx.save_model(size_threshold=1024)` measures it, with `sys.getsizeof`); tensors are appended in
the order the builder makes them; a tensor over 1 MiB starts at a multiple of 64 KiB (onnx-ir's and
onnxruntime's alignment for memory mapping: the allocation granularity, the largest padding the onnx checker
accepts between tensors).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

SIZE_THRESHOLD = 1024          # as save_onnx: smaller tensors stay inside the graph
ALIGN_THRESHOLD = 1 << 20      # tensors over 1 MiB are aligned ...
ALIGNMENT = 1 << 16            # ... to the allocation granularity, so a runtime can map them in place
BLOCK_BYTES = 1 << 24          # an array is written in row blocks of about this size


class ExternalData:
    """Appends initializers' bytes to a data file and turns each TensorProto into a reference to them.

    Written to `path` (a temporary name chosen by the caller); the references name `location`, the file's final
    name relative to the graph."""

    def __init__(self, path: str | os.PathLike, location: str):
        self.path, self.location = Path(path), location
        self.handle = open(self.path, "wb")
        self.pos = 0
        self.tensors = 0

    def array(self, name: str, array):
        """A TensorProto for `array` whose bytes go straight to the file (when large enough), written in
        row blocks from the array as it is, so neither a contiguous copy nor a bytes copy of the whole array
        is ever made (a transposed weight view is written block by block). None when the array is small:
        the caller keeps it inside the graph."""
        import numpy as np
        from onnx import TensorProto, helper

        if array.nbytes + sys.getsizeof(b"") < SIZE_THRESHOLD:   # as `take` measures raw_data
            return None
        tensor = TensorProto(name=name, dims=list(array.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        start = self._start(array.nbytes)
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        step = max(1, BLOCK_BYTES // max(1, rows[0].nbytes))
        for r in range(0, rows.shape[0], step):
            self.handle.write(memoryview(np.ascontiguousarray(rows[r:r + step].astype(rows.dtype.newbyteorder("<"),
                                                                                          copy=False))))
        self._refer(tensor, start, array.nbytes)
        return tensor

    def _start(self, length: int) -> int:
        """Where a tensor of `length` bytes starts (aligned when large), padding the file up to it."""
        start = self.pos
        if length > ALIGN_THRESHOLD:
            start = -(-start // ALIGNMENT) * ALIGNMENT
            if start > self.pos:
                self.handle.write(bytes(start - self.pos))
        return start

    def _refer(self, tensor, start: int, length: int) -> None:
        """Make `tensor` a reference to `length` bytes at `start` (what onnx's set_external_data writes)."""
        from onnx import TensorProto

        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.pos = start + length
        self.tensors += 1

    def take(self, tensor):
        """Move `tensor`'s raw bytes to the file (when large enough) and return it as an external reference."""
        if not tensor.HasField("raw_data") or sys.getsizeof(tensor.raw_data) < SIZE_THRESHOLD:
            return tensor
        raw = tensor.raw_data
        start = self._start(len(raw))
        self.handle.write(raw)
        tensor.ClearField("raw_data")
        self._refer(tensor, start, len(raw))
        return tensor

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()

    def discard(self) -> None:
        """Close and remove the file (a failed export leaves nothing)."""
        if not self.handle.closed:
            self.handle.close()
        self.path.unlink(missing_ok=True)
