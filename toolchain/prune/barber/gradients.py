"""Barber's gradient pass: block losses and per-window gradients of the dense blocks on the sparse layer's inputs.

One pass runs the sparse layer over every calibration window, capturing each sub-block's input u (the pruned
model's own normed hidden state) and sparse output y_s; the dense copy of the block runs on the same u with
gradients. Loss per window n: L_n = mean((y_d - y_s)^2). For a linear layer the per-window weight gradient is
g_n^T x_n (output gradient times input), so all windows of a batch come from one backward to the linears'
outputs (`taps.OutputTaps`) and a batched matmul, instead of one backward per window.

Three things keep the pass cheap:
- `record_dense_block`: a decoder layer's first sub-block (the attention) sees the layer input through a norm
  only, so its dense forward in the init method's statistics pass on the dense copy is exactly the one this pass
  needs; it is recorded there with its graph and only its backward runs here.
- `Replay`: the MLP's pass gets the (rebuilt) attention's outputs from the caller instead of recomputing them.
- `to_end=False`: the attention's pass stops the sparse layer after the attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...models.base import SubBlock, first_tensor
from .taps import GradModeSpan, OutputTaps


def reduced_precision(device: torch.device | str) -> torch.dtype | None:
    """bfloat16 where `device` multiplies it natively, else None (plain float32).

    Barber's dense-block gradients only rank weights (the reference computes them in float16), so a narrower
    type is purely a speed choice, and which way it goes depends on the hardware: an AVX512-BF16 CPU multiplies
    bfloat16 faster than float32, while an AVX2-only CPU (no bfloat16 kernels in oneDNN) emulates it far slower
    (`bench/scripts/matmul_dtype.py` measures both). CUDA: bfloat16 where the GPU supports it. The choice depends only on
    the hardware, so one machine always gives the same masks."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):   # a build without oneDNN
            return None
    return None


def resolve_grad_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype | None:
    """`"auto"`: `reduced_precision(device)`; a dtype or None (float32) as given."""
    return reduced_precision(device) if dtype == "auto" else dtype


def dense_autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast for the dense blocks (None: plain float32)."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def per_window_grad_sq(grad_out: torch.Tensor, x: torch.Tensor, batch: int,
                       dtype: torch.dtype | None) -> torch.Tensor:
    """sum_n (g_n^T x_n)^2 over the windows of a batch: the per-window weight gradients of a linear layer.

    The batched product runs in `dtype` (None: float32) with float32 accumulation: it only ranks weights."""
    dtype = dtype or torch.float32
    g = grad_out.detach().reshape(batch, -1, grad_out.shape[-1]).to(dtype)
    x = x.detach().reshape(batch, -1, x.shape[-1]).to(dtype)
    return torch.bmm(g.transpose(1, 2), x).float().square().sum(dim=0)


def window_losses(y_dense: torch.Tensor, y_sparse: torch.Tensor, windows: int) -> torch.Tensor:
    """Block loss per window: mean((y_dense - y_sparse)^2) over each window's outputs."""
    return (y_dense - y_sparse).reshape(windows, -1).square().mean(dim=1)


def entry_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's input in its captured entry call: the first argument, or `hidden_states=`."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


def graded_linears(block: SubBlock, exit_terms: bool) -> tuple[str, ...]:
    """The linears scored by per-window gradients: all of the block's, or with the exit terms
    (`taylor-exit`) all but its last, which the exit terms score."""
    return block.linears[:-1] if exit_terms else block.linears


# ---------------------------------------------------------------- the dense first block, recorded
ENTRY_INPUT = "entry input"   # a recorded linear input that is the block's own input


@dataclass
class RecordedBlock:
    """A dense sub-block's forward on every calibration batch, with its autograd graph (`record_dense_block`)."""

    block: SubBlock
    taps: OutputTaps
    batches: list = field(default_factory=list)    # per engine batch: (output with its graph, {linear: input})


@contextlib.contextmanager
def record_dense_block(dense_layer, block: SubBlock, exit_terms: bool):
    """While active, every forward of `dense_layer` records `block`'s output with its graph (`RecordedBlock`).

    Run around the init method's statistics pass on the dense layer: a decoder layer's FIRST sub-block (the
    attention) sees the layer input through a norm only, so its input in that pass is exactly the one Barber's
    attention pass gives it, and its forward there can stand in for Barber's dense forward, which is then not
    run again. The block runs in float32 with grad mode on (a `GradModeSpan` from its entry to its exit); the rest
    of the layer does not see the graph. The graphs hold what the attention's backward needs (q, k, v, output
    per token, about the memory of the recomputed pass's records) until Barber's pass has used them."""
    taps = OutputTaps(dense_layer, graded_linears(block, exit_terms))
    recorded = RecordedBlock(block, taps)
    grad_on = GradModeSpan()
    entry: list[torch.Tensor] = []

    def on_entry(module, args, kwargs):
        entry[:] = [entry_input(args, kwargs)]
        grad_on.enter()

    def on_exit(module, args, output):
        grad_on.exit()
        y = first_tensor(output)
        # A linear that reads the block input itself (q, k, v) is not kept: Barber's pass has the same values as
        # its own block input (`ENTRY_INPUT`).
        inputs = {n: ENTRY_INPUT if x is entry[0] else x for n, x in taps.take_inputs().items()}
        recorded.batches.append((y, inputs))
        entry.clear()
        return (y.detach(), *output[1:]) if isinstance(output, tuple) else y.detach()

    hooks = [dense_layer.get_submodule(block.entry).register_forward_pre_hook(on_entry, with_kwargs=True),
             dense_layer.get_submodule(block.exit).register_forward_hook(on_exit)]
    try:
        yield recorded
    finally:
        for h in hooks:
            h.remove()
        taps.remove()
        grad_on.close()


# ---------------------------------------------------------------- one pass
@dataclass
class BlockRecord:
    """One sub-block's share of a pass over the calibration windows, batch by batch."""

    g2: dict[str, torch.Tensor]              # mean over windows of the squared per-window gradient, per linear
    loss: float                              # mean block loss, dense vs sparse, over windows
    # The block's last linear, at the sparse weights (`exit_terms`): -dL/dW_sparse and sum_t x_tj^2 of its
    # sparse input, both means over windows; tokens per window.
    exit_grad: torch.Tensor | None = None
    exit_in_sq: torch.Tensor | None = None
    tokens: int = 0
    # Kept for the last block of the pass only (Barber's passes have one block each):
    calls: list[tuple[tuple, dict]] = field(default_factory=list)    # the block's entry call (its input)
    dense_out: list[torch.Tensor] = field(default_factory=list)
    sparse_out: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)                   # windows per batch
    exit_in: list[torch.Tensor] = field(default_factory=list)        # with exit terms: the last linear's input
    out_tail: tuple | None = None    # the rest of the block module's output tuple (e.g. attention weights)

    @classmethod
    def empty(cls, block: SubBlock, dense_layer) -> BlockRecord:
        return cls({n: torch.zeros_like(dense_layer.get_submodule(n).weight, dtype=torch.float32)
                    for n in block.linears}, 0.0)

    def add_exit_terms(self, x: torch.Tensor, y_dense: torch.Tensor, y_sparse: torch.Tensor, windows: int,
                       grad_dtype: torch.dtype | None) -> None:
        """Add one span's -dL/dW_sparse = 2/(T d_out) (y_dense - y_sparse)^T x_sparse of the last linear (x its
        sparse input, [tokens, in]) and its input energy. The product runs in `grad_dtype` with float32
        accumulation, as the per-window gradients do (it ranks weights)."""
        residual = (y_dense.detach().float() - y_sparse).reshape(x.shape[0], -1)
        if self.exit_grad is None:
            self.exit_grad = torch.zeros(residual.shape[1], x.shape[1], device=x.device)
            self.exit_in_sq = torch.zeros(x.shape[1], device=x.device)
        self.tokens = x.shape[0] // windows
        low = grad_dtype or torch.float32
        self.exit_grad += (residual.T.to(low) @ x.to(low)).float() * (2.0 / (self.tokens * residual.shape[1]))
        self.exit_in_sq += x.square().sum(dim=0)

    def keep_for_rerun(self, call: tuple[tuple, dict], y_dense: torch.Tensor, y_sparse: torch.Tensor,
                       windows: int) -> None:
        """Keep what `rerun_block` needs: the block's entry call, its dense and sparse outputs."""
        self.calls.append(call)
        self.dense_out.append(y_dense.detach())
        self.sparse_out.append(y_sparse)
        self.sizes.append(windows)

    def average_over(self, windows: int) -> None:
        """Turn the sums over windows into means."""
        windows = max(windows, 1)
        self.g2 = {n: g / windows for n, g in self.g2.items()}
        if self.exit_grad is not None:
            self.exit_grad /= windows
            self.exit_in_sq /= windows
        self.loss /= windows


@dataclass(frozen=True)
class Replay:
    """An earlier block of the layer that does not run in a pass: its module returns `outputs` (every window's,
    in window order; `tail` is the rest of its output tuple), an output the caller already has."""

    block: SubBlock
    outputs: torch.Tensor
    tail: tuple | None = None


@dataclass(frozen=True)
class PassOptions:
    """How `gradient_pass` runs.

    grad_dtype: the dense blocks run under autocast to it (None: float32; "auto": `reduced_precision`).
    exit_terms: also record each block's last-linear terms at the sparse weights (`taylor-exit`).
    to_end: run the sparse layer to its end and return its output; False stops it after the last block.
    replay: an earlier block whose outputs the caller already has, replayed instead of run.
    recorded: a block whose dense forward was recorded with its graph on these batches (`record_dense_block`);
        it does not run again, its backward runs on the recorded graph."""

    grad_dtype: torch.dtype | str | None = "auto"
    exit_terms: bool = False
    to_end: bool = True
    replay: Replay | None = None
    recorded: RecordedBlock | None = None


class _StopLayer(Exception):
    """Raised by a hook to end a layer's forward once the blocks a pass needs have run."""


class _SparseCapture:
    """Hooks on the sparse layer for one pass: each block's entry call and output, with exit terms its last
    linear's input; unless the pass runs to the layer's end, the layer stops after the last block. A context
    manager: the hooks always come off."""

    def __init__(self, layer, blocks: Sequence[SubBlock], exit_terms: bool, to_end: bool):
        self.calls: dict[str, tuple[tuple, dict]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.exit_inputs: dict[str, torch.Tensor] = {}
        self.last_tail: tuple | None = None     # the rest of the last block's output tuple, from the first batch
        self._last, self._to_end = blocks[-1].name, to_end
        self._handles = []
        for b in blocks:
            self._handles.append(layer.get_submodule(b.entry).register_forward_pre_hook(
                lambda m, a, k, name=b.name: self.calls.__setitem__(name, (a, k)), with_kwargs=True))
            self._handles.append(layer.get_submodule(b.exit).register_forward_hook(
                lambda m, a, o, name=b.name: self._on_exit(name, o)))
        if exit_terms:   # after the exit hooks: where the exit is the last linear, a stop comes first
            for b in blocks:
                self._handles.append(layer.get_submodule(b.linears[-1]).register_forward_hook(
                    lambda m, a, o, name=b.name: self.exit_inputs.__setitem__(name, a[0])))

    def _on_exit(self, name: str, output) -> None:
        self.outputs[name] = first_tensor(output)
        if name == self._last and isinstance(output, tuple) and self.last_tail is None:
            self.last_tail = output[1:]
        if name == self._last and not self._to_end:
            raise _StopLayer

    @torch.no_grad()
    def run(self, engine, layer, hidden: torch.Tensor) -> torch.Tensor | None:
        """The sparse layer on one batch: its output, or None when the pass stops after its last block."""
        self.calls.clear()
        self.outputs.clear()
        self.exit_inputs.clear()
        try:
            return engine.call_layer(layer, hidden)
        except _StopLayer:
            return None

    def __enter__(self) -> _SparseCapture:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.calls.clear()
        self.outputs.clear()
        self.exit_inputs.clear()


@contextlib.contextmanager
def _replaying(layer, replay: Replay | None, windows: int):
    """While active, the replayed block's module returns the caller's outputs instead of running; yields
    `select(s)`, which picks the outputs of the windows in slice `s` for the next call.

    The module's own forward must not run at all (skipping its cost is the point), which a forward hook cannot
    do, so its `forward` is shadowed by an instance attribute for exactly the span of the pass."""
    if replay is None:
        yield lambda s: None
        return
    module = layer.get_submodule(replay.block.exit)
    rows = replay.outputs.shape[0] // windows   # rows per window
    current: list = [None]

    def replayed_forward(*args, **kwargs):
        return (current[0], *replay.tail) if replay.tail is not None else current[0]

    def select(s: slice) -> None:
        current[0] = replay.outputs[s.start * rows:s.stop * rows]
    module.forward = replayed_forward
    try:
        yield select
    finally:
        del module.forward   # the module's own forward again


def _batch_slice(call: tuple[tuple, dict], out: torch.Tensor, batch: int, lo: int, hi: int
                 ) -> tuple[tuple, dict, torch.Tensor]:
    """A captured block call and its output, cut to windows lo:hi of the `batch` windows. The block's input
    tells the layout: [batch, ...] or flattened [batch * T, ...] (OPT's MLP); every tensor with that first
    dimension is cut, shared ones (RoPE tables, broadcast masks) pass as they are."""
    args, kwargs = call
    x = entry_input(args, kwargs)
    rows = x.shape[0]
    if rows % batch:
        raise RuntimeError(f"a block input of {rows} rows does not split into {batch} windows")
    if (lo, hi) == (0, batch):
        return args, kwargs, out
    per = rows // batch

    def cut(v):
        if isinstance(v, torch.Tensor):
            return v[lo * per:hi * per] if v.dim() > 0 and v.shape[0] == rows else v
        if isinstance(v, (tuple, list)):
            return type(v)(cut(u) for u in v)
        return v
    return cut(args), {k: cut(v) for k, v in kwargs.items()}, cut(out)


def _check_recorded(recorded: RecordedBlock | None, blocks: Sequence[SubBlock], engine) -> None:
    if recorded is None:
        return
    names = [b.name for b in blocks]
    n_batches = len(list(engine.batches()))
    if recorded.block.name not in names or len(recorded.batches) != n_batches:
        raise ValueError(f"the recorded block {recorded.block.name!r} ({len(recorded.batches)} batches) does not "
                         f"belong to this pass (blocks {names}, {n_batches} batches)")


@dataclass
class _DenseBlocks:
    """Where a pass's dense block outputs and their backwards come from: the block recomputed on the dense layer
    under autocast to `grad_dtype`, or, for the `recorded` block, its recorded forward."""

    dense_layer: torch.nn.Module
    taps: OutputTaps
    recorded: RecordedBlock | None
    device_type: str
    grad_dtype: torch.dtype | None

    def is_recorded(self, block: SubBlock) -> bool:
        return self.recorded is not None and block.name == self.recorded.block.name

    def backward(self, block: SubBlock, index: int, call: tuple[tuple, dict], y_sparse: torch.Tensor,
                 windows: int):
        """The dense block's output on the sparse layer's block input `call` (batch `index` of the pass) and the
        backward of its window losses: (y_dense, per-window losses, output gradients by linear, linear inputs)."""
        if self.is_recorded(block):
            y_dense, inputs = self.recorded.batches[index]
            self.recorded.batches[index] = None        # the graph goes with this backward
            inputs = {n: entry_input(*call) if x is ENTRY_INPUT else x for n, x in inputs.items()}
            per_window = window_losses(y_dense, y_sparse, windows)
            return y_dense, per_window, self.recorded.taps.backward(per_window.sum()), inputs
        args, kwargs = call
        with torch.enable_grad(), dense_autocast(self.device_type, self.grad_dtype):
            y_dense = block.run(self.dense_layer, args, kwargs)
            per_window = window_losses(y_dense, y_sparse, windows)
            grads = self.taps.backward(per_window.sum())
        return y_dense, per_window, grads, self.taps.take_inputs()


def _spans(full: int, half: int, whole: bool) -> list[tuple[int, int]]:
    """The window ranges the dense block runs on: half batches, so that the backward, which keeps every
    activation of the block, stays near a plain forward at full batch; a recorded block's graph is a whole
    batch's (made by the statistics pass), so it is used at full batch."""
    return [(0, full)] if whole else [(lo, min(lo + half, full)) for lo in range(0, full, half)]


def gradient_pass(engine, layer, dense_layer, hidden: torch.Tensor, blocks: Sequence[SubBlock],
                  options: PassOptions = PassOptions()) -> tuple[dict[str, BlockRecord], torch.Tensor | None]:
    """One pass of the sparse `layer` over every window, capturing each block's input and output;
    each dense block runs on the captured input (the pruned model's own) with gradients, giving the block
    loss L_n = mean((y_dense - y_sparse)^2) per window n and G2 = mean_n (dL_n/dW)^2 for its linears.
    The dense blocks run under autocast to `options.grad_dtype`: their forward and backward are most of Barber's
    cost, and the result only ranks weights. The sparse layer stays float32: its output is the next layer's input.
    With exit terms, each block's last linear also gets the gradient at the SPARSE weights and its sparse input's
    energy (`taylor_score`), from the sparse layer's own forward: one product per batch and no backward.
    Returns the records per block name and the sparse layer's output for every window (None unless `to_end`).
    The sparse layer runs on the walk's own batches, so a rebuild that changes nothing hands the next layer
    exactly what the init method alone would."""
    grad_dtype = resolve_grad_dtype(options.grad_dtype, hidden.device)
    exit_terms = options.exit_terms
    _check_recorded(options.recorded, blocks, engine)
    records = {b.name: BlockRecord.empty(b, dense_layer) for b in blocks}
    last = blocks[-1].name
    layer_out = torch.empty_like(hidden) if options.to_end else None
    half = max(1, engine.batch_size // 2)
    windows = 0
    recomputed = [n for b in blocks if options.recorded is None or b.name != options.recorded.block.name
                  for n in graded_linears(b, exit_terms)]
    with _SparseCapture(layer, blocks, exit_terms, options.to_end) as capture, \
            OutputTaps(dense_layer, recomputed) as taps, \
            _replaying(layer, options.replay, hidden.shape[0]) as select_replay:
        dense = _DenseBlocks(dense_layer, taps, options.recorded, hidden.device.type, grad_dtype)
        for index, s in enumerate(engine.batches()):
            select_replay(s)
            out = capture.run(engine, layer, hidden[s])
            if layer_out is not None:
                layer_out[s] = out
            full = s.stop - s.start
            for b in blocks:
                for lo, hi in _spans(full, half, dense.is_recorded(b)):
                    _grade_span(records[b.name], b, capture, dense, index, (full, lo, hi), keep=b.name == last,
                                exit_terms=exit_terms)
            windows += full
        if capture.last_tail is not None:
            records[last].out_tail = capture.last_tail
    for rec in records.values():
        rec.average_over(windows)
    return records, layer_out


def _grade_span(rec: BlockRecord, block: SubBlock, capture: _SparseCapture, dense: _DenseBlocks, index: int,
                span: tuple[int, int, int], keep: bool, exit_terms: bool) -> None:
    """Add windows lo:hi of batch `index` (`full` windows) to `block`'s record: its loss, its linears' squared
    per-window gradients, with exit terms its last linear's; `keep`: also what a rerun of the block needs."""
    full, lo, hi = span
    windows = hi - lo
    args, kwargs, y_sparse = _batch_slice(capture.calls[block.name], capture.outputs[block.name], full, lo, hi)
    y_dense, per_window, grads, inputs = dense.backward(block, index, (args, kwargs), y_sparse, windows)
    for n in graded_linears(block, exit_terms):
        if n in grads:
            rec.g2[n] += per_window_grad_sq(grads[n], inputs[n], windows, dense.grad_dtype)
    if exit_terms:
        x = capture.exit_inputs[block.name]
        x = x.reshape(full, -1, x.shape[-1])[lo:hi].reshape(-1, x.shape[-1]).float()
        rec.add_exit_terms(x, y_dense, y_sparse, windows, dense.grad_dtype)
        if keep:
            rec.exit_in.append(x)
    rec.loss += float(per_window.detach().sum())
    if keep:
        rec.keep_for_rerun((args, kwargs), y_dense, y_sparse, windows)


@torch.no_grad()
def block_loss(engine, layer, dense_layer, hidden: torch.Tensor, block: SubBlock,
               dense_dtype: torch.dtype | str | None = "auto") -> float:
    """Mean over windows of mean((dense block(u) - sparse block(u))^2), u = the pruned layer's block input; the
    dense block runs under autocast to `dense_dtype`, as in `gradient_pass`, so the two losses compare."""
    dense_dtype = resolve_grad_dtype(dense_dtype, hidden.device)
    total, windows = 0.0, 0
    for s in engine.batches():
        args, kwargs, y_sparse = engine.capture_block(layer, hidden[s], block)
        with dense_autocast(hidden.device.type, dense_dtype):
            y_dense = block.run(dense_layer, args, kwargs)
        total += float(window_losses(y_dense, y_sparse, s.stop - s.start).sum())
        windows += s.stop - s.start
    return total / max(windows, 1)
