"""The blob's shared layout (docs/blob-format.md): header and manifest constants, the blob's errors, section
alignment, and the quantization group arithmetic the writer and the reader both derive from a tensor's shape."""
from __future__ import annotations

import struct

import numpy as np

from ...errors import ToolchainError
from ...numerics.geometry import group_count

MAGIC = b"TCBLOB\0\0"
VERSION = 1
FORMAT = "toolchain.blob"
ALIGN = 64
HEADER_SIZE = 64
# magic, version, flags, manifest length, manifest CRC-32, header CRC-32 (of the 28 bytes before it)
HEADER = struct.Struct("<8sIIQII")
HEADER_CRC_SPAN = 28
MAX_DIM = 1 << 32
MAX_NUMEL = 1 << 48
FIXED_BITS = 16


class BlobError(ToolchainError):
    """A blob cannot be written (the model's state does not fit the format) or a helper got bad input."""


class BlobFormatError(BlobError):
    """A file is not a valid blob: truncated, corrupted, of another version, or self-inconsistent."""


def align(x: int) -> int:
    """The first ALIGN-byte boundary at or after byte `x`."""
    return (x + ALIGN - 1) // ALIGN * ALIGN


def group_lengths(cols: int, group_size: int) -> np.ndarray:
    """Columns in each quantization group along `cols` (the last one shorter when the size does not divide)."""
    size = cols if group_size == -1 else group_size
    ng = group_count(cols, group_size)
    lengths = np.full(ng, size, np.int64)
    if ng:
        lengths[-1] = cols - size * (ng - 1)
    return lengths


def column_zeros(zeros: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-group zero points [rows, n_groups] -> per-column [rows, cols]."""
    return np.repeat(zeros, lengths, axis=1)

