"""The DRAM image of a bundle: every layer's weight and scale words in the byte layout the DRAM-fed system
(`spmac_system`) reads, and the descriptor table its sequencer walks. The layout is specified in docs/fpga.md.

    header      64 bytes at 0: magic, version, layer count, table offset, descriptor size, alignment, image size
    table       one 64-byte descriptor per layer, in model order, at `table_offset`
    regions     per layer, 64-byte aligned: for every row pass q, its scale section (the scale words of
                pass q) then its weight section (the weight words of pass q), each padded to 64 bytes

A weight word is the `$readmemh` word of `layers.memory_images` (every PE's slots of one beat), stored in
ceil(bits / 8) bytes, least significant byte first; a scale word likewise. Regions are pass-major, so the
first q passes of a layer are a prefix of its region.
"""
from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError, ToolchainError
from ..numerics.geometry import row_passes
from .config import AccelConfig

ALIGN = 64                       # every region and section starts on a 64-byte boundary (a DRAM burst)
DESCRIPTOR_BYTES = 64
HEADER_MAGIC = b"TCDRAM1\0"
DESCRIPTOR_MAGIC = 0x444D5053    # "SPMD", little-endian; the sequencer refuses a descriptor without it
IMAGE_VERSION = 1
_HEADER = struct.Struct("<8sIIIIIQ")                 # magic, version, layers, table offset, desc bytes, align, size
_DESCRIPTOR = struct.Struct("<QIIIIIIIIIII")         # see `descriptor`


class DramImageError(ToolchainError):
    """A DRAM image is malformed or disagrees with the blob."""

    exit_status = 1


@dataclass(frozen=True)
class DramConfig:
    """The memory system of the DRAM-fed design (saved as dram/layout.json's "config")."""

    data_bits: int = 512         # AXI4 read data width
    addr_bits: int = 32
    max_burst: int = 16          # beats per AXI burst
    outstanding: int = 4         # bursts in flight
    fifo_words: int = 128        # weight FIFO between the read master and the array, in bus words

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"DRAM config: {msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{f.name} must be a positive integer")
        need(self.data_bits in (32, 64, 128, 256, 512), f"data_bits must be 32..512, a power of two, got "
                                                        f"{self.data_bits} (the image aligns to {ALIGN} bytes)")
        need(12 <= self.addr_bits <= 48, f"addr_bits must be in 12..48, got {self.addr_bits}")
        need(_pow2(self.max_burst) and self.max_burst <= 256 and self.max_burst * self.data_bits // 8 <= 4096,
             f"max_burst must be a power of two <= 256 whose burst stays within 4 KB, got {self.max_burst}")
        need(_pow2(self.outstanding), f"outstanding must be a power of two, got {self.outstanding}")
        need(_pow2(self.fifo_words) and self.fifo_words >= self.max_burst,
             f"fifo_words must be a power of two >= max_burst, got {self.fifo_words}")

    @property
    def bus_bytes(self) -> int:
        return self.data_bits // 8


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def word_bytes(cfg: AccelConfig) -> tuple[int, int]:
    """Bytes of one weight word and of one scale word in the image."""
    weight_bits = cfg.pes * cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx)
    return -(-weight_bits // 8), -(-cfg.pes * cfg.scale_bits // 8)


def _words_to_bytes(lines: list[str], nbytes: int) -> bytes:
    """$readmemh words (hex, most significant digit first) as little-endian words of `nbytes` bytes."""
    return b"".join(bytes.fromhex(line.rjust(2 * nbytes, "0"))[::-1] for line in lines)


def layer_region(cfg: AccelConfig, k: int, rows: int, group_size: int, weight_lines: list[str],
                 scale_lines: list[str]) -> tuple[bytes, dict]:
    """One layer's region (pass-major scale and weight sections) and its geometry."""
    wbytes, sbytes = word_bytes(cfg)
    passes, bpr, gpr = row_passes(rows, cfg.pes), k // cfg.beat_k, k // group_size
    if len(weight_lines) != passes * bpr or len(scale_lines) != passes * gpr:
        raise DramImageError(f"a {rows} x {k} layer needs {passes * bpr} weight and {passes * gpr} scale words; "
                             f"got {len(weight_lines)} and {len(scale_lines)}")
    geo = {"k": k, "rows": rows, "passes": passes, "beats_per_row": bpr, "scale_bytes": gpr * sbytes,
           "scale_stride": _align(gpr * sbytes), "weight_bytes": bpr * wbytes, "weight_stride": _align(bpr * wbytes)}
    geo["region_bytes"] = passes * (geo["scale_stride"] + geo["weight_stride"])
    out = bytearray(geo["region_bytes"])
    pos = 0
    for q in range(passes):
        scales = _words_to_bytes(scale_lines[q * gpr:(q + 1) * gpr], sbytes)
        out[pos:pos + len(scales)] = scales
        pos += geo["scale_stride"]
        weights = _words_to_bytes(weight_lines[q * bpr:(q + 1) * bpr], wbytes)
        out[pos:pos + len(weights)] = weights
        pos += geo["weight_stride"]
    return bytes(out), geo


def descriptor(base: int, shift: int, geo: dict) -> bytes:
    """The 64-byte descriptor of a layer whose region starts at `base` (layout in docs/fpga.md)."""
    body = _DESCRIPTOR.pack(base, geo["k"], geo["rows"], geo["passes"], geo["beats_per_row"], shift,
                            geo["scale_bytes"], geo["scale_stride"], geo["weight_bytes"], geo["weight_stride"],
                            geo["region_bytes"], DESCRIPTOR_MAGIC)
    return body + bytes(DESCRIPTOR_BYTES - len(body))


def parse_descriptor(raw: bytes) -> dict:
    keys = ("base", "k", "rows", "passes", "beats_per_row", "shift", "scale_bytes", "scale_stride",
            "weight_bytes", "weight_stride", "region_bytes", "magic")
    return dict(zip(keys, _DESCRIPTOR.unpack_from(raw)))


def build_image(layers: list[dict]) -> tuple[bytes, list[dict]]:
    """The image of `layers` (each: name, shift, region, geometry), and its table (one dict per layer with its
    base address and descriptor fields)."""
    table_offset = ALIGN
    pos = _align(table_offset + DESCRIPTOR_BYTES * len(layers))
    table = []
    for layer in layers:
        table.append({"name": layer["name"], "base": pos, "shift": layer["shift"], **layer["geometry"]})
        pos += _align(len(layer["region"]))
    image = bytearray(pos)
    image[:_HEADER.size] = _HEADER.pack(HEADER_MAGIC, IMAGE_VERSION, len(layers), table_offset, DESCRIPTOR_BYTES,
                                        ALIGN, pos)
    for i, (layer, entry) in enumerate(zip(layers, table)):
        image[table_offset + i * DESCRIPTOR_BYTES:table_offset + (i + 1) * DESCRIPTOR_BYTES] = \
            descriptor(entry["base"], entry["shift"], layer["geometry"])
        image[entry["base"]:entry["base"] + len(layer["region"])] = layer["region"]
    return bytes(image), table


def read_header(image: bytes) -> dict:
    if len(image) < _HEADER.size:
        raise DramImageError(f"the DRAM image has {len(image)} bytes, fewer than its header's {_HEADER.size}")
    magic, version, layers, table_offset, desc_bytes, align, size = _HEADER.unpack_from(image)
    if magic != HEADER_MAGIC or version != IMAGE_VERSION:
        raise DramImageError(f"not a DRAM image of this version (magic {magic!r}, version {version})")
    if size != len(image):
        raise DramImageError(f"the DRAM image has {len(image)} bytes; its header says {size}")
    return {"layers": layers, "table_offset": table_offset, "descriptor_bytes": desc_bytes, "align": align,
            "size": size}


def read_table(image: bytes) -> list[dict]:
    head = read_header(image)
    return [parse_descriptor(image[head["table_offset"] + i * DESCRIPTOR_BYTES:][:DESCRIPTOR_BYTES])
            for i in range(head["layers"])]


def cut_image(image: bytes, table: list[dict], picks: list[tuple[int, int]], pes: int) -> tuple[bytes, list[dict]]:
    """A smaller image holding the layers `picks` (index into `table`, row passes to keep), in that order:
    each region cut to its first passes (a prefix, since regions are pass-major), descriptors rewritten."""
    layers = []
    for index, passes in picks:
        d = table[index]
        passes = max(1, min(passes, d["passes"]))
        pass_bytes = d["scale_stride"] + d["weight_stride"]
        geo = {key: d[key] for key in ("k", "beats_per_row", "scale_bytes", "scale_stride", "weight_bytes",
                                       "weight_stride")}
        geo.update(rows=min(d["rows"], passes * pes), passes=passes,
                   region_bytes=passes * pass_bytes)
        region = image[d["base"]:d["base"] + passes * pass_bytes]
        layers.append({"name": str(index), "shift": d["shift"], "region": region, "geometry": geo})
    return build_image(layers)


def layout_json(cfg: AccelConfig, dram: DramConfig, table: list[dict], image_bytes: int) -> dict:
    wbytes, sbytes = word_bytes(cfg)
    return {"format": "toolchain.fpga.dram/1", "config": asdict(dram), "image": "model.dram",
            "image_bytes": image_bytes, "align": ALIGN, "descriptor_bytes": DESCRIPTOR_BYTES,
            "weight_word_bytes": wbytes, "scale_word_bytes": sbytes, "table_offset": ALIGN, "layers": table}
