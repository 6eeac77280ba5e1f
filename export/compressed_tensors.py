"""compressed-tensors export: a checkpoint in vLLM's `pack-quantized` format, bit-exact to the integer truth.

`export_compressed_tensors(model_dir, out_dir)` reads a compressed model directory (see `export.source`) and
writes a Hugging Face directory that the compressed-tensors library (and so transformers and vLLM) reads:

- `config.json`: the input config plus `quantization_config` (quant_method "compressed-tensors", format
  "pack-quantized", status "compressed", one config group per distinct weight scheme, `ignore`, the
  library version, and a "dense" `sparsity_config` naming the N:M structure when the model was pruned);
- the weights, with the input's shard layout: per quantized linear `weight_packed` (int32), `weight_scale`,
  `weight_shape` (int64 [2]) and, when asymmetric, `weight_zero_point` (int32, packed along the output
  dimension); every other tensor (norms, embeddings, biases, an untied lm_head) unchanged;
- the tokenizer, generation config and other side files, copied.

Conventions of compressed-tensors (checked against the installed library, see docs/compressed-tensors.md):
codes are signed, [-2^(b-1), 2^(b-1)-1], for symmetric and asymmetric schemes alike, and are offset by
2^(b-1) when packed (`compressors/pack_quantized/helpers.py: pack_to_int32`); a zero point is a signed code
too. Our asymmetric codes and zeros are unsigned, so both are shifted by 2^(b-1), which leaves
`code - zero` unchanged. The library dequantizes as `(code - zero).to(scale.dtype) * scale`
(`quantization/lifecycle/forward_helpers.py: _dequantize`), so float32 scales (holding our fp16-exact
values) make the decompressed weight equal `scale * (code - zero)` in float32 bit for bit.

The library's group strategy needs the group size to divide the input dimension (`_process_group` raises
otherwise); our last group may be shorter. Such a layer is written with the group size
gcd(group_size, in_features), every original group's scale repeated over its sub-groups: the same weights,
exactly, at the cost of more scales. `group_size == -1` is the library's "channel" strategy.

The packed codes come from `quant_state.safetensors`, never from re-quantizing the float weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..errors import ConfigError, ModelLoadError
from ..quant import QuantizedWeight
from .source import COMPRESSION, QUANT_STATE, CompressedModel, read_compressed

__all__ = ["export_compressed_tensors", "quantization_config_for", "pack_layer", "SCALE_DTYPES"]

FORMAT = "pack-quantized"
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INDEX_NAME = "model.safetensors.index.json"
# Files of the input directory that are never copied: rewritten here, toolchain-internal, or float weights.
_NOT_COPIED = {"config.json", INDEX_NAME, QUANT_STATE, COMPRESSION}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
# Sibling linears that vLLM fuses into one layer (qkv_proj, gate_up_proj); a fused layer takes one scheme.
_FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True, order=True)
class CTScheme:
    """One compressed-tensors weight scheme: what a config group holds."""

    bits: int
    symmetric: bool
    strategy: str              # "group" or "channel"
    group_size: int | None     # None for "channel"

    def weights_args(self) -> dict:
        args = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
                "dynamic": False}
        if self.strategy == "group":
            args["group_size"] = self.group_size
        return args


def scheme_for(name: str, qw: QuantizedWeight) -> CTScheme:
    """The compressed-tensors scheme that holds `qw` exactly; ConfigError when there is none."""
    spec = qw.spec
    if not 1 <= spec.bits <= 8:
        raise ConfigError(f"{name}: {spec.bits}-bit codes cannot be written as pack-quantized "
                          f"(compressed-tensors packs 1 to 8 bits)")
    if qw.codes.dim() != 2:
        raise ConfigError(f"{name}: expected 2-D codes, got shape {tuple(qw.codes.shape)}")
    cols = qw.codes.shape[1]
    if spec.group_size == -1:
        return CTScheme(spec.bits, spec.symmetric, "channel", None)
    # Every original group boundary is a multiple of g or the row end, so of gcd(g, cols).
    return CTScheme(spec.bits, spec.symmetric, "group", math.gcd(spec.group_size, cols))


def _check_layer(name: str, qw: QuantizedWeight) -> None:
    """Refuse an inconsistent integer state rather than pack it silently wrong."""
    spec, codes = qw.spec, qw.codes
    rows, cols = codes.shape
    n_groups = len(spec.groups(cols))
    if tuple(qw.scales.shape) != (rows, n_groups) or tuple(qw.zeros.shape) != (rows, n_groups):
        raise ModelLoadError(f"{name}: scales {tuple(qw.scales.shape)} / zeros {tuple(qw.zeros.shape)} do not "
                             f"match {n_groups} groups of {spec.group_size} over a [{rows}, {cols}] weight")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < spec.qmin or hi > spec.qmax:
        raise ModelLoadError(f"{name}: codes span [{lo}, {hi}], outside the {spec.bits}-bit "
                             f"{'symmetric' if spec.symmetric else 'asymmetric'} range [{spec.qmin}, {spec.qmax}]")
    if not spec.symmetric:
        zlo, zhi = int(qw.zeros.min()), int(qw.zeros.max())
        if zlo < 0 or zhi > spec.qmax:
            raise ModelLoadError(f"{name}: zero points span [{zlo}, {zhi}], outside [0, {spec.qmax}]")
    if not torch.isfinite(qw.scales).all() or not bool((qw.scales > 0).all()):
        raise ModelLoadError(f"{name}: scales must be finite and positive")
    if qw.prune_mask is not None:
        if tuple(qw.prune_mask.shape) != (rows, cols):
            raise ModelLoadError(f"{name}: prune mask shape {tuple(qw.prune_mask.shape)} is not {(rows, cols)}")
        if bool((codes != _zero_codes(qw))[qw.prune_mask].any()):
            raise ModelLoadError(f"{name}: a pruned weight does not hold the zero code; quant_state is inconsistent")


def pack_layer(name: str, qw: QuantizedWeight, scheme: CTScheme, scale_dtype: torch.dtype = torch.float32
               ) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (local names: weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    _check_layer(name, qw)
    spec = qw.spec
    rows, cols = qw.codes.shape
    if (scheme.bits, scheme.symmetric) != (spec.bits, spec.symmetric) or (
            scheme.strategy == "group" and any((b - a) % scheme.group_size for a, b in spec.groups(cols))):
        raise ConfigError(f"{name}: scheme {scheme} cannot hold {spec} over {cols} input columns")
    offset = 0 if spec.symmetric else 1 << (spec.bits - 1)   # unsigned asymmetric codes -> library's signed codes
    codes = (qw.codes - offset).to(torch.int8)
    if scheme.strategy == "channel":
        scales, zeros = qw.scales, qw.zeros
    else:
        # Repeat each original group's parameters over its sub-groups of scheme.group_size columns.
        repeats = torch.tensor([(b - a) // scheme.group_size for a, b in spec.groups(cols)])
        scales = torch.repeat_interleave(qw.scales, repeats, dim=1)
        zeros = torch.repeat_interleave(qw.zeros, repeats, dim=1)
    if scales.to(scale_dtype).float().ne(scales.float()).any():
        raise ConfigError(f"{name}: a scale is not exactly representable in {scale_dtype}; use float32 scales")
    out = {
        "weight_packed": pack_to_int32(codes, spec.bits),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not spec.symmetric:
        out["weight_zero_point"] = pack_to_int32((zeros - offset).to(torch.int8), spec.bits, packed_dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def _linear_module_names(model_dir: Path) -> list[str] | None:
    """Names of every torch.nn.Linear of the model (a tied lm_head included), from a weightless instance."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@dataclass(frozen=True)
class LayerFacts:
    """What the config needs of one quantized linear, so the codes are read once and then dropped."""

    scheme: CTScheme
    group_size: int            # the layer's own group size (-1: per channel); the scheme's may be a divisor
    weights: int               # codes.numel()
    pruned: int | None         # prune_mask.sum(), None without a mask


def layer_facts(model: CompressedModel) -> dict[str, LayerFacts]:
    """Every quantized linear's scheme and pruned count, one linear at a time (a lazily read quant state holds
    one in memory); refuses a layer whose codes break the N:M structure compression.json names."""
    facts = {}
    nm = model.nm
    for name in model.quant:
        qw = model.quant[name]
        if qw.prune_mask is not None and nm is not None:
            n, m = nm
            cols = (qw.codes.shape[1] // m) * m
            nonzero = (qw.codes[:, :cols] != _zero_codes(qw)[:, :cols]).reshape(qw.codes.shape[0], -1, m)
            if int(nonzero.sum(dim=2).max()) > n:
                raise ModelLoadError(f"{name}: compression.json says {n}:{m} pruning but a block of {m} input "
                                     f"columns holds more than {n} nonzero codes")
        facts[name] = LayerFacts(scheme_for(name, qw), qw.spec.group_size, qw.codes.numel(),
                                 None if qw.prune_mask is None else int(qw.prune_mask.sum()))
    return facts


def _sparsity(model: CompressedModel, facts: dict[str, LayerFacts]) -> dict | None:
    """Sparsity of the quantized linears: structure, global fraction pruned, layers with pruned weights."""
    masked = sorted(name for name, f in facts.items() if f.pruned is not None)
    if not masked:
        return None
    total = sum(f.weights for f in facts.values())
    pruned = sum(facts[name].pruned for name in masked)
    structure = "unstructured" if model.nm is None else f"{model.nm[0]}:{model.nm[1]}"
    return {"structure": structure, "global_sparsity": pruned / total, "layers": masked}


def _zero_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The zero code of every weight position ([out, in])."""
    out = torch.empty_like(qw.codes)
    for gi, (a, b) in enumerate(qw.spec.groups(qw.codes.shape[1])):
        out[:, a:b] = qw.zeros[:, gi:gi + 1]
    return out


def quantization_config_for(model: CompressedModel, linears: list[str] | None = None,
                            facts: dict[str, LayerFacts] | None = None) -> tuple[dict, dict]:
    """(the `quantization_config` entry of config.json, {scheme group name: [layer names]}).

    One config group per distinct scheme. With one scheme the group targets the class "Linear" and `ignore`
    names every other Linear (lm_head, tied or not); with several, each group lists its layers by exact name.
    Without the list of Linear modules (`linears`), groups always target exact names. `facts`: the model's
    `layer_facts`, when the caller has them already."""
    import compressed_tensors
    from compressed_tensors.config import DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    facts = layer_facts(model) if facts is None else facts
    by_scheme: dict[CTScheme, list[str]] = defaultdict(list)
    for name, f in facts.items():
        by_scheme[f.scheme].append(name)
    schemes = sorted(by_scheme)
    if linears is not None:
        not_linear = sorted(set(model.quant) - set(linears))
        if not_linear:
            linears = None          # a quantized module that is not an nn.Linear: name everything exactly
    ignore = sorted(set(linears) - set(model.quant)) if linears is not None else []
    by_class = linears is not None and len(schemes) == 1
    groups, members = {}, {}
    for i, scheme in enumerate(schemes):
        names = sorted(by_scheme[scheme])
        targets = ["Linear"] if by_class else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=scheme.weights_args(), format=FORMAT)
        members[f"group_{i}"] = names
    qconfig = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                 ignore=ignore)
    sparsity = _sparsity(model, facts)
    sparsity_config = {}
    if sparsity is not None:
        # vLLM looks every non-ignored linear up in the sparsity targets: they must cover all quantized layers.
        targets = ["Linear"] if by_class else sorted(model.quant)
        unpruned = sorted(set(model.quant) - set(sparsity["layers"]))
        sparsity_config = DenseSparsityConfig(targets=targets, ignore=ignore + unpruned,
                                              global_sparsity=round(sparsity["global_sparsity"], 6),
                                              sparsity_structure=sparsity["structure"]).model_dump(mode="json")
    entry = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
             "sparsity_config": sparsity_config, "transform_config": {},
             **qconfig.model_dump(mode="json", exclude={"quant_method"})}
    return entry, members


def _fused_scheme_notes(facts: dict[str, LayerFacts]) -> list[str]:
    """Layers that vLLM fuses (q/k/v, gate/up) but that carry different schemes (mixed precision)."""
    notes = []
    parents: dict[str, dict[str, CTScheme]] = defaultdict(dict)
    for name, f in facts.items():
        parent, _, leaf = name.rpartition(".")
        parents[parent][leaf] = f.scheme
    for parent, leaves in sorted(parents.items()):
        for siblings in _FUSED_SIBLINGS:
            found = {leaves[s] for s in siblings if s in leaves}
            if len(found) > 1:
                notes.append(f"{parent}: {'/'.join(siblings)} have different schemes; vLLM fuses them into one "
                             f"layer that takes the first one's scheme, so it cannot serve this checkpoint "
                             f"(compressed-tensors and transformers read it exactly)")
    return notes


def export_compressed_tensors(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                              scale_dtype: str = "float32", streaming: bool = False) -> dict:
    """Write the compressed-tensors (pack-quantized) checkpoint of the compressed model at `model_dir`.

    `scale_dtype` "float32" (default) makes the library's decompressed float32 weights equal ours bit for
    bit; "float16" halves the scale bytes (our scales are fp16-exact) and the library then decompresses in
    float16 (our weights rounded once to fp16). `streaming`: the quantization state is read one linear at a
    time (`QuantStateFile`) rather than all at once; either way the output is written one input shard at a time,
    so the float model is never whole in memory. Returns a summary: files and sizes, config groups with
    their layer counts, ignore list, sparsity, notes, seconds."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..models.loading import check_out_dir

    start = time.perf_counter()
    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    dtype = SCALE_DTYPES[scale_dtype]
    model = read_compressed(model_dir, require_quant=True, lazy=streaming)
    check_out_dir(model.path, out_dir)
    if not len(model.quant):
        raise ModelLoadError(f"{model.path / QUANT_STATE} holds no quantized layers; nothing to pack")
    facts = layer_facts(model)
    entry, members = quantization_config_for(model, _linear_module_names(model.path), facts)
    QuantizationConfig.model_validate(entry)   # what transformers and vLLM will parse

    files: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    seen: set[str] = set()
    with atomic_dir(out_dir) as tmp:
        for src in model.weight_files():
            tensors: dict[str, torch.Tensor] = {}
            try:
                handle = safe_open(str(src), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:
                raise ModelLoadError(f"cannot read {src}: {exc}") from None
            for key in keys:
                module, _, param = key.rpartition(".")
                if param == "weight" and module in model.quant:
                    qw = model.quant[module]
                    float_w = handle.get_tensor(key)
                    if tuple(float_w.shape) != tuple(qw.codes.shape):
                        raise ModelLoadError(f"{module}: {src.name} has a {tuple(float_w.shape)} weight, "
                                             f"{QUANT_STATE} has {tuple(qw.codes.shape)} codes")
                    if not torch.equal(float_w, qw.dequantize().to(float_w.dtype)):
                        raise ModelLoadError(f"{module}: the weight in {src.name} is not scale * (code - zero) of "
                                             f"{QUANT_STATE}; the two files are out of step (re-run quantize)")
                    for local, tensor in pack_layer(module, qw, facts[module].scheme, dtype).items():
                        tensors[f"{module}.{local}"] = tensor
                    seen.add(module)
                else:
                    tensors[key] = handle.get_tensor(key)
            del handle
            save_file(tensors, str(tmp / src.name), metadata={"format": "pt"})
            weight_map.update({key: src.name for key in tensors})
            del tensors
        missing = sorted(set(model.quant) - seen)
        if missing:
            raise ModelLoadError(f"{QUANT_STATE} has layers with no `.weight` in the checkpoint: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if (model.path / INDEX_NAME).is_file() or len(model.weight_files()) > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

        config = dict(model.config)
        config["quantization_config"] = entry
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = []
        for f in sorted(model.path.iterdir()):
            if (f.is_file() and not f.name.startswith(".") and f.name not in _NOT_COPIED
                    and not f.name.endswith(_WEIGHT_SUFFIXES)):
                shutil.copy2(f, tmp / f.name)
                copied.append(f.name)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}

    groups = {}
    for gname, group in entry["config_groups"].items():
        w = group["weights"]
        groups[gname] = {"num_bits": w["num_bits"], "symmetric": w["symmetric"], "strategy": w["strategy"],
                         "group_size": w.get("group_size"), "layers": len(members[gname]),
                         "regrouped": sum(1 for n in members[gname]
                                          if facts[n].group_size not in (-1, w.get("group_size")))}
    sparsity = entry["sparsity_config"] or None
    return {
        "out_dir": str(Path(out_dir).resolve()),
        "format": FORMAT,
        "compressed_tensors_version": entry["version"],
        "scale_dtype": scale_dtype,
        "quantized_layers": len(model.quant),
        "config_groups": groups,
        "ignore": entry["ignore"],
        "sparsity": None if sparsity is None else {"structure": sparsity["sparsity_structure"],
                                                   "global_sparsity": sparsity["global_sparsity"]},
        "files": files,
        "copied": copied,
        "total_bytes": sum(files.values()),
        "notes": _fused_scheme_notes(facts),
        "seconds": round(time.perf_counter() - start, 3),
    }
