"""The `$readmemh` images a bundle ships (mem/<layer>.weights.mem, mem/<layer>.scales.mem), held against the
blob they are built from: every word checked, and a layer's images cut to its first rows for simulation.

The images are what a hardware engineer takes into their flow, so simulation runs on them, and the expected
words are regenerated independently from model.tcblob (`layers.memory_images`) to check them."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ToolchainError
from ..numerics.geometry import row_passes
from .config import AccelConfig, load_config
from .dram import DESCRIPTOR_BYTES, layer_region, parse_descriptor, read_header, read_table
from .layers import LayerData, for_design, memory_images, read_layer


class ImageMismatchError(ToolchainError):
    """A shipped image is missing, malformed, or disagrees with the blob."""

    exit_status = 1   # a failed check, like a simulation mismatch


def read_image(path: Path) -> list[str]:
    """The words of a `$readmemh` file as written by `layers.write_images`: one hex word per line."""
    if not path.is_file():
        raise ImageMismatchError(f"the shipped image {path} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _value(line: str) -> int | None:
    try:
        return int(line, 16)
    except ValueError:
        return None


def compare_image(path: Path, found: list[str], expected: list[str], layer: str) -> None:
    """Raise naming the layer, the file, the first differing word (0-based line) and both values."""
    if found == expected:
        return
    for word, (got, want) in enumerate(zip(found, expected)):
        if got != want and _value(got) != _value(want):
            raise ImageMismatchError(f"{layer}: {path} word {word} (line {word + 1}) is {got!r}; the blob gives "
                                     f"{want!r}")
    if len(found) != len(expected):
        raise ImageMismatchError(f"{layer}: {path} has {len(found)} words; the blob gives {len(expected)}")


def check_layer_images(cfg: AccelConfig, layer: LayerData, weight_path: Path, scale_path: Path,
                       dram: tuple[Path, bytes, dict] | None = None) -> int:
    """Every word of one layer's two shipped images against the words regenerated from the blob; the count.
    `dram`: (path, image, table entry): the layer's region of the DRAM image is checked against them too."""
    weight_lines, scale_lines = memory_images(cfg, layer)
    compare_image(weight_path, read_image(weight_path), weight_lines, layer.name)
    compare_image(scale_path, read_image(scale_path), scale_lines, layer.name)
    if dram is not None:
        check_dram_region(cfg, layer, weight_lines, scale_lines, *dram)
    return len(weight_lines) + len(scale_lines)


def check_dram_region(cfg: AccelConfig, layer: LayerData, weight_lines: list[str], scale_lines: list[str],
                      path: Path, image: bytes, entry: dict) -> None:
    """The layer's descriptor and region in the DRAM image against the region built from the blob's words."""
    expected, geometry = layer_region(cfg, layer.k, layer.rows, layer.group_size, weight_lines, scale_lines)
    found = parse_descriptor(image[entry["descriptor_offset"]:entry["descriptor_offset"] + 64])
    for key, value in {**geometry, "shift": layer.shift, "base": entry["base"]}.items():
        if found[key] != value:
            raise ImageMismatchError(f"{layer.name}: {path} descriptor field {key} is {found[key]}; the blob gives "
                                     f"{value}")
    got = image[entry["base"]:entry["base"] + len(expected)]
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise ImageMismatchError(f"{layer.name}: {path} byte {entry['base'] + at} (region byte {at}) is "
                                 f"{got[at:at + 1].hex() or 'missing'}; the blob gives {expected[at:at + 1].hex()}")


def check_bundle_images(bundle: str | Path) -> dict:
    """Check every image of every layer of a bundle against its blob, without simulation."""
    from ..export.blob import read_blob

    bundle = Path(bundle)
    t0 = time.perf_counter()
    cfg = load_config(bundle / "accel.json")
    table = json.loads((bundle / "layers.json").read_text())["layers"]
    words = 0
    dram_path = bundle / "dram" / "model.dram"
    image = dram_path.read_bytes() if dram_path.is_file() else None
    dram_table = {}
    if image is not None:
        head = read_header(image)
        names = [e["name"] for e in json.loads((bundle / "dram" / "layout.json").read_text())["layers"]]
        if len(names) != head["layers"]:
            raise ImageMismatchError(f"{dram_path} holds {head['layers']} descriptors; layout.json lists {len(names)}")
        dram_table = {name: {"base": d["base"], "descriptor_offset": head["table_offset"] + i * DESCRIPTOR_BYTES}
                      for i, (name, d) in enumerate(zip(names, read_table(image)))}
    with read_blob(bundle / "model.tcblob") as blob:
        quantized = {blob.entry(n)["module"] for n in blob.names() if blob.entry(n)["kind"] == "quant"}
        unlisted = sorted(quantized - {entry["name"] for entry in table})
        if unlisted:
            raise ImageMismatchError(f"layers.json lists no images for {len(unlisted)} quantized layer(s) of the "
                                     f"blob, e.g. {unlisted[0]}")
        for entry in table:
            layer = for_design(read_layer(blob, entry["name"]), cfg)
            weight_path, scale_path = image_paths(bundle, entry)
            if image is not None and entry["name"] not in dram_table:
                raise ImageMismatchError(f"{entry['name']}: no descriptor in {dram_path}")
            dram = (dram_path, image, dram_table[entry["name"]]) if image is not None else None
            words += check_layer_images(cfg, layer, weight_path, scale_path, dram)
    return {"layers": len(table), "words": words, "seconds": round(time.perf_counter() - t0, 2)}


def image_paths(bundle: Path, entry: dict) -> tuple[Path, Path]:
    """The shipped weight and scale images of a layers.json entry."""
    return bundle / "mem" / entry["weight_file"], bundle / "mem" / entry["scale_file"]


def first_rows_images(cfg: AccelConfig, layer: LayerData, rows: int, weight_lines: list[str],
                      scale_lines: list[str]) -> tuple[list[str], list[str]]:
    """The images of `layer.first_rows(rows)`, cut from the shipped lines of the whole layer.

    The images are pass-major (word (q, b): rows q*P .. q*P+P-1), so the first ceil(rows / P) passes are a
    prefix of the lines; in the last of them the PEs past `rows` must hold zeros, as they do past a layer's end:
    their fields (PE p at bit p * field width) are masked off, the others kept as shipped."""
    rows = max(1, min(rows, layer.rows))
    p, passes = cfg.pes, row_passes(rows, cfg.pes)
    keep = rows - (passes - 1) * p                       # PEs of the last pass that carry real rows
    slot_bits = cfg.slots_per_beat * (cfg.weight_bits + cfg.widths.idx)
    per_pass = ((layer.k // cfg.beat_k, slot_bits, weight_lines, "weights"),
                (layer.k // layer.group_size, cfg.scale_bits, scale_lines, "scales"))
    out = []
    for words_per_pass, field_bits, lines, kind in per_pass:
        needed = passes * words_per_pass
        if len(lines) < needed:
            raise ImageMismatchError(f"{layer.name}: the shipped {kind} image has {len(lines)} words; "
                                     f"{rows} rows need {needed}")
        cut = lines[:needed]
        digits = -(-p * field_bits // 4)
        mask = (1 << (keep * field_bits)) - 1
        for word in range(needed - words_per_pass, needed):
            value = _value(cut[word])
            if value is None:
                raise ImageMismatchError(f"{layer.name}: the shipped {kind} image's word {word} {cut[word]!r} "
                                         f"is not hexadecimal")
            cut[word] = f"{value & mask:0{digits}x}"
        out.append(cut)
    return out[0], out[1]


def write_first_rows_images(cfg: AccelConfig, layer: LayerData, rows: int, shipped: tuple[Path, Path],
                            directory: Path) -> tuple[Path, Path]:
    """Write the first-rows cut of the shipped images into `directory`; their paths."""
    weight_lines, scale_lines = first_rows_images(cfg, layer, rows, read_image(shipped[0]), read_image(shipped[1]))
    stem = layer.name.replace("/", "_")
    paths = directory / f"{stem}.rows{rows}.weights.mem", directory / f"{stem}.rows{rows}.scales.mem"
    directory.mkdir(parents=True, exist_ok=True)
    for path, lines in zip(paths, (weight_lines, scale_lines)):
        path.write_text("\n".join(lines) + "\n")
    return paths
