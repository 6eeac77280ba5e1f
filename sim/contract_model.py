"""The whole decoder under the accelerator's arithmetic: every linear the bundle accelerates is replaced by
`ContractLinear`, which computes it exactly as contract.json says (per-token int8 activations, the blob's codes
and fixed-point scales, integer sums, round half up and saturation at the output). Everything else (embeddings,
norms, attention softmax, RoPE, biases, the LM head) stays the float model's, as the host would run it.

The codes and scales come from the bundle's model.tcblob (`fpga.layers.read_layer`, `for_design`), the same
source as the per-layer golden model (`sim.golden.layer_outputs`) that the RTL is checked against."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fpga.config import AccelConfig
from ..fpga.layers import LayerData, for_design, read_layer
from .golden import quantize_activations, round_shift, saturate

EXACT_FLOAT64 = 1 << 53    # every integer below this is a float64, and so is every sum of them that stays below
EXACT_FLOAT32 = 1 << 24


class ContractLinear(torch.nn.Module):
    """One accelerated linear in the contract's integer arithmetic, batched over tokens and rows.

    The contract sums code x activation per quantization group, multiplies each group sum by its mantissa
    and sums over groups. Folding the mantissa into the code (code x mantissa, one integer per weight) makes
    that one matrix product, total = a @ folded^T. In float64 it is exact: every product and partial sum is an
    integer below 2^53 (checked here from the worst case), so the order BLAS sums in cannot change it. The
    design's proven accumulator widths hold these sums, so the RTL's two's-complement registers never wrap
    and the contract needs no `wrap` here. Then, per the contract, round half up by the layer's shift,
    saturate, and multiply by the token's activation scale; the bias is the host's, added in float.

    `act_bits` other than the design's, and `rounding` other than half up, are for measuring what the
    arithmetic costs and for proving the checks can fail; they are not the contract."""

    def __init__(self, layer: LayerData, cfg: AccelConfig, bias: torch.Tensor | None = None,
                 act_bits: int | None = None, rounding: str = "half_up"):
        super().__init__()
        self.name, self.k, self.rows = layer.name, layer.k, layer.rows
        self.act_bits = act_bits or cfg.act_bits
        # each activation bit past the design's doubles the integer outputs (they count units of the token's
        # activation scale), so a wider what-if widens the output by as many bits: it then measures the
        # activations' rounding alone, not a saturation the design would never see
        self.shift, self.out_bits = layer.shift, cfg.out_bits + max(0, self.act_bits - cfg.act_bits)
        self.rounding = rounding
        mantissas = np.repeat(layer.scales_fixed.astype(np.int64), layer.group_size, axis=1)
        folded = layer.dense_codes() * mantissas                                        # [rows, K] int64
        largest = int(np.abs(folded).max(initial=0))
        bound = int(np.abs(folded).sum(axis=1).max(initial=0)) * ((1 << (self.act_bits - 1)) - 1)
        if bound >= EXACT_FLOAT64:
            raise ConfigError(f"{layer.name}: a row total can reach {bound}, past float64's exact integers; "
                              f"the model evaluator cannot compute this layer exactly")
        # stored as float32 when every folded weight is exactly one (half the memory), widened per call
        dtype = np.float32 if largest < EXACT_FLOAT32 else np.float64
        self.register_buffer("folded_t", torch.from_numpy(np.ascontiguousarray(folded.T.astype(dtype))),
                             persistent=False)
        self.bias = bias
        self.capture = 0                         # tokens of the next call to keep in `captured` (0: none)
        self.captured: dict | None = None
        self.saturated = 0                       # outputs clamped so far
        self.outputs = 0

    def integer_outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(activation codes [T, K], activation scales [T], integer outputs [T, rows]) of float inputs [T, K]."""
        acts, scale = quantize_activations(x, self.act_bits)
        total = torch.from_numpy(acts.astype(np.float64)) @ self.folded_t.to(torch.float64)
        out = saturate(round_shift(total.numpy().astype(np.int64), self.shift, self.rounding), self.out_bits)
        return acts, scale, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.detach().reshape(-1, self.k).to("cpu", torch.float64).numpy()
        acts, scale, out = self.integer_outputs(flat)
        lo, hi = -(1 << (self.out_bits - 1)), (1 << (self.out_bits - 1)) - 1
        self.saturated += int(((out == lo) | (out == hi)).sum())
        self.outputs += out.size
        if self.capture:
            n = self.capture
            self.captured = {"x": flat[:n].copy(), "acts": acts[:n].copy(), "scale": scale[:n].copy(),
                             "out": out[:n].copy()}
            self.capture = 0
        y = torch.from_numpy(out.astype(np.float64) * scale[:, None]).to(x.dtype).reshape(*lead, self.rows)
        y = y.to(x.device)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.name}: K={self.k}, rows={self.rows}, shift={self.shift}, act_bits={self.act_bits}, "
                f"out_bits={self.out_bits}, rounding={self.rounding}")


def accelerated_layers(bundle: Path) -> list[str]:
    """The bundle's accelerated linears (layers.json), in model order."""
    return [e["name"] for e in json.loads((Path(bundle) / "layers.json").read_text())["layers"]]


def act_bits_for(name: str, overrides: dict[str, int] | None) -> int | None:
    """The activation width `overrides` gives `name` (keys: a linear's name suffix, e.g. down_proj, or `all`)."""
    for key, bits in (overrides or {}).items():
        if key == "all" or name == key or name.endswith("." + key):
            return bits
    return None


def install_contract(model: torch.nn.Module, bundle: Path, cfg: AccelConfig, rounding: str = "half_up",
                     act_bits: dict[str, int] | None = None, atol: float = 1e-3) -> dict[str, ContractLinear]:
    """Replace every accelerated linear of `model` (in place) by its `ContractLinear`, built from the bundle's
    blob. The model must be the one the bundle was exported from: each linear's float weight is checked
    against the blob's dequantized codes (max |difference| <= atol x the largest |weight|)."""
    from ..export.blob import read_blob

    installed: dict[str, ContractLinear] = {}
    with read_blob(Path(bundle) / "model.tcblob") as blob:
        for name in accelerated_layers(bundle):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"the model has no module {name}, which the bundle accelerates: it is not the "
                                  f"model the bundle was exported from") from None
            weight = module.weight.detach().float().cpu().numpy()
            dequantized = blob.dequantized(name)
            if weight.shape != dequantized.shape:
                raise ConfigError(f"{name}: the model's weight is {tuple(weight.shape)}, the bundle's "
                                  f"{tuple(dequantized.shape)}: not the model the bundle was exported from")
            diff = float(np.abs(weight - dequantized).max(initial=0))
            if diff > atol * max(float(np.abs(dequantized).max(initial=0)), 1e-12):
                raise ConfigError(f"{name}: the model's weights differ from the bundle's codes x scales by up to "
                                  f"{diff:.3g}: not the model the bundle was exported from (give --model)")
            layer = for_design(read_layer(blob, name), cfg)
            bias = None if module.bias is None else module.bias.detach()
            contract = ContractLinear(layer, cfg, bias, act_bits_for(name, act_bits), rounding)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, contract)
            installed[name] = contract
    return installed
