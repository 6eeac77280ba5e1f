"""PyTorch's semi-structured (2:4) sparse weights for a model's linears, on CUDA.

`plan_semi_structured` decides, on any device, which `nn.Linear` layers can take
`torch.sparse.to_sparse_semi_structured` weights, which need zero padding to the kernels' minimum shapes and
which are skipped (and why). `swap_to_semi_structured` carries the plan out on a CUDA GPU; without one it
raises a ConfigError before touching the model. `semi_structured_unavailable` says, without touching a model,
why this machine cannot run the kernels (`toolchain gpu-run --backend torch` asks it first).

docs/gpu-semi-structured.md describes the shape rules; toolchain.gpu.cutlass_layout is the offline packer into
the CUTLASS layout these tensors hold.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .cutlass_layout import pad_dense
from .sparsity import two_four_status

BACKENDS = ("cusparselt", "cutlass")
SWAP_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Model: plan (pure, any device) and swap (CUDA).

def _resolve_backend(backend: str | None) -> str:
    if backend is None:
        return "cutlass" if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    if backend not in BACKENDS:
        raise ConfigError(f"semi-structured backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _backend_class(backend: str):
    return (torch.sparse.SparseSemiStructuredTensorCUTLASS if backend == "cutlass"
            else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)


def min_shape(dtype=torch.float16, backend: str | None = None) -> tuple[int, int]:
    """(rows, cols) a weight must be a positive multiple of, read from the installed PyTorch's backend class."""
    backend = _resolve_backend(backend)
    constraints = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    if dtype not in constraints:
        raise ConfigError(f"PyTorch's {backend} semi-structured backend takes "
                          f"{', '.join(str(d).replace('torch.', '') for d in constraints)}, not {dtype}")
    c = constraints[dtype]
    return int(c.sparse_min_rows), int(c.sparse_min_cols)


def _round_up(x: int, mult: int) -> int:
    return -(-x // mult) * mult


def plan_semi_structured(model: nn.Module, dtype=torch.float16, backend: str | None = None,
                         max_padded_ratio: float = 2.0) -> dict:
    """Which `nn.Linear` layers of `model` can hold a semi-structured weight. Touches nothing.

    Each layer gets an action: "sparse" (2:4 along K, shape accepted as is), "padded" (2:4, zero-padded to
    `padded_shape`, the next multiples of the backend's minimum shape), or "skipped" with a reason: not 2:4
    along K, a weight shared with another module (tied), already semi-structured, or padding that would make
    the GEMM at least `max_padded_ratio` times larger (2:4 saves at most 2x)."""
    backend = _resolve_backend(backend)
    min_rows, min_cols = min_shape(dtype, backend)
    if not max_padded_ratio > 1.0:
        raise ConfigError(f"max_padded_ratio must be > 1, got {max_padded_ratio}")
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        out_f, in_f = (int(s) for s in weight.shape)
        entry = {"name": name, "shape": [out_f, in_f], "action": "skipped", "padded_shape": None, "reason": None}
        layers.append(entry)
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            entry["reason"] = "weight is already semi-structured"
            continue
        shared = [p for p in owners.get(id(weight), []) if p != (f"{name}.weight" if name else "weight")]
        if shared:
            entry["reason"] = f"weight is shared with {', '.join(shared)} (tied); replacing it would untie them"
            continue
        status = two_four_status(weight)
        if not status["two_four"]:
            entry["reason"] = f"not 2:4 along K (in_features): {status['reason']}"
            continue
        rows, cols = _round_up(out_f, min_rows), _round_up(in_f, min_cols)
        if (rows, cols) == (out_f, in_f):
            entry["action"] = "sparse"
            continue
        ratio = rows * cols / (out_f * in_f)
        if ratio >= max_padded_ratio:
            entry["reason"] = (f"shape [{out_f}, {in_f}] is not a multiple of {backend}'s minimum [{min_rows}, "
                               f"{min_cols}] and padding to [{rows}, {cols}] makes the GEMM {ratio:.2f}x larger "
                               f"(limit {max_padded_ratio:g}x)")
            continue
        if not name:
            entry["reason"] = (f"shape [{out_f}, {in_f}] needs padding to [{rows}, {cols}], and the model itself is "
                               f"this linear (nothing to put the padded module in)")
            continue
        entry.update(action="padded", padded_shape=[rows, cols],
                     reason=f"shape [{out_f}, {in_f}] is not a multiple of {backend}'s minimum [{min_rows}, "
                            f"{min_cols}]: zero-padded to [{rows}, {cols}]")
    counts = {a: sum(1 for e in layers if e["action"] == a) for a in ("sparse", "padded", "skipped")}
    return {"dtype": str(dtype).replace("torch.", ""), "backend": backend, "min_shape": [min_rows, min_cols],
            "max_padded_ratio": max_padded_ratio, "layers": layers, **counts}


class PaddedSemiStructuredLinear(nn.Module):
    """A linear whose weight was zero-padded to [rows, cols] for the sparse kernels: the input is zero-padded
    to `cols` features and the output cut back to `out_features`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        rows, cols = weight.shape
        if rows < out_features or cols < in_features:
            raise ConfigError(f"padded weight [{rows}, {cols}] is smaller than [{out_features}, {in_features}]")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = self.weight.shape[1]
        if x.shape[-1] != cols:
            x = F.pad(x, (0, cols - x.shape[-1]))
        y = F.linear(x, self.weight, self.bias)
        return y[..., :self.out_features] if self.weight.shape[0] != self.out_features else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"padded={list(self.weight.shape)}")


def semi_structured_unavailable(device=None) -> str | None:
    """Why this PyTorch build and machine cannot run semi-structured sparse kernels on `device` (default the
    current CUDA device); None when they can. Looks at the build and the device only, never at a model."""
    if not (hasattr(torch.sparse, "to_sparse_semi_structured")
            and hasattr(torch.sparse, "SparseSemiStructuredTensor")):
        return (f"PyTorch {torch.__version__} has no semi-structured sparse tensors "
                f"(torch.sparse.to_sparse_semi_structured arrived in PyTorch 2.1)")
    if not torch.cuda.is_available():
        why = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA device is visible"
        return ("semi-structured sparse kernels need a CUDA GPU (cuSPARSELt or CUTLASS, compute capability 8.0 "
                f"or newer), and torch.cuda.is_available() is False here ({why})")
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return f"semi-structured sparse kernels run on a CUDA device, got device {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return (f"semi-structured sparse kernels need compute capability 8.0 or newer (Ampere); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None


def _require_cuda(device) -> torch.device:
    why = semi_structured_unavailable(device)
    if why is not None:
        raise ConfigError(f"{why}; run on an Ampere-or-newer NVIDIA GPU, or use `toolchain export --target gpu` "
                          f"for TensorRT")
    return torch.device("cuda" if device is None else device)


def swap_to_semi_structured(model: nn.Module, dtype=torch.float16, backend: str | None = None,
                            device=None, max_padded_ratio: float = 2.0, check: bool = True) -> dict:
    """Give every 2:4 `nn.Linear` of `model` a PyTorch semi-structured sparse weight, for inference on CUDA.

    Moves the model to `device` (default "cuda") and `dtype` (float16 or bfloat16; the kernels need the
    activations in the weight's dtype), then per plan_semi_structured: "sparse" layers get
    `weight = to_sparse_semi_structured(weight)`, "padded" ones become PaddedSemiStructuredLinear, the rest stay
    dense. A layer PyTorch refuses at conversion is skipped with PyTorch's message. `check` runs each swapped
    layer on a random input against its dense weight and records `max_abs_err`. Returns the plan with each
    layer's final action. Without CUDA raises ConfigError before touching the model."""
    if dtype not in SWAP_DTYPES:
        raise ConfigError(f"semi-structured swap takes dtype float16 or bfloat16, got {dtype} (int8/fp8 sparse "
                          f"GEMMs need quantized activations)")
    requested = backend
    backend = _resolve_backend(backend)
    device = _require_cuda(device)
    note = None
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        if requested is not None:
            raise ConfigError("backend 'cusparselt' was asked for, but this PyTorch build has no cuSPARSELt "
                              "(torch.backends.cusparselt.is_available() is False); use backend='cutlass'")
        backend, note = "cutlass", "cuSPARSELt is not available in this PyTorch build: using CUTLASS"
    report = plan_semi_structured(model, dtype, backend, max_padded_ratio)
    report["device"] = str(device)
    if note:
        report["note"] = note
    cls = _backend_class(backend)
    convert = (torch.sparse.to_sparse_semi_structured if backend == _resolve_backend(None) else cls.from_dense)
    model.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for entry in report["layers"]:
            if entry["action"] == "skipped":
                continue
            module = model.get_submodule(entry["name"])
            dense = module.weight.detach()
            if entry["action"] == "padded":
                dense = pad_dense(dense, *entry["padded_shape"])
            try:
                sparse = convert(dense.contiguous())
            except RuntimeError as exc:
                entry.update(action="skipped", padded_shape=None,
                             reason=f"PyTorch's {backend} conversion refused it: {str(exc).splitlines()[0]}")
                continue
            if check:
                probe = torch.randn(64, dense.shape[1], device=device, dtype=dtype, generator=gen)
                ref = F.linear(probe, dense)
                got = F.linear(probe, sparse)
                err = float((got.float() - ref.float()).abs().max())
                entry["max_abs_err"] = err
                if not np.isfinite(err) or err > 1e-2 * max(1.0, float(ref.float().abs().max())):
                    entry.update(action="skipped", padded_shape=None,
                                 reason=f"the {backend} sparse GEMM differs from the dense one by {err:g} on a "
                                        f"random input; left dense")
                    continue
            if entry["action"] == "sparse":
                module.weight = nn.Parameter(sparse, requires_grad=False)
            else:
                out_f, in_f = entry["shape"]
                bias = None
                if module.bias is not None:
                    bias = F.pad(module.bias.detach(), (0, entry["padded_shape"][0] - out_f))
                parent_name, _, child = entry["name"].rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, PaddedSemiStructuredLinear(sparse, bias, in_f, out_f))
    for action in ("sparse", "padded", "skipped"):
        report[action] = sum(1 for e in report["layers"] if e["action"] == action)
    report["backend"] = backend
    return report
