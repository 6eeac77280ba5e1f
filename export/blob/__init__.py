"""The weight blob: a packed, versioned, checksummed file of a compressed model's sparse low-bit weights.

Written for the FPGA target and any C/C++ runtime; docs/blob-format.md specifies every byte. In short:

- a 64-byte header (magic, format version, manifest length and CRC-32, header CRC-32), then a UTF-8 JSON
  manifest, then sections, each at a 64-byte aligned file offset with zero bytes between them;
- a quantized linear stores its codes packed LSB-first at the code width (2/3/4/8 bits, 3-bit dense), and,
  when the model is N:M and the layer's mask is N:M, only the N slots of every group of M input columns,
  with each slot's column index in the group as ceil(log2 M) bits; scales as fp16 and as 16-bit fixed point
  with one per-tensor fraction width; zero points (asymmetric only) packed at the code width;
- every other tensor (embeddings, norms, biases, unquantized linears) as fp16.

`write_blob` reads a compressed model directory (`toolchain.export.source`) and writes atomically;
`read_blob` memory-maps a blob, validates its structure at once and each section's CRC-32 on first use.
Round trips are bit-exact to quant_state.safetensors.

Modules: `format` (header constants, errors, alignment and group arithmetic), `packing` (bit streams),
`nm` (the N:M slot layout), `writer` (`write_blob` and the section encoders), `reader` (`Blob`, `read_blob`
and validation).
"""
from .format import BlobError, BlobFormatError
from .nm import nm_compress, nm_expand, nm_select, nm_slot_mask
from .packing import pack_codes, packed_size, unpack_codes
from .reader import Blob, read_blob
from .writer import write_blob

__all__ = ["Blob", "BlobError", "BlobFormatError", "nm_compress", "nm_expand", "nm_select", "nm_slot_mask",
           "pack_codes", "packed_size", "read_blob", "unpack_codes", "write_blob"]
