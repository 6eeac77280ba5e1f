"""Autograd taps: the gradient of a loss with respect to chosen linears' OUTPUTS, without weight gradients.

Barber's per-window weight gradients of a linear are g_n^T x_n (output gradient times input), so it needs each
linear's output gradient and input, never the weight gradient itself. A tap is an identity on the linear's
output that, in the backward, hands that output's gradient over; a backward to the tap's scalar then computes
only what those gradients need, whatever the weights' `requires_grad`.
"""
from __future__ import annotations

from typing import Sequence

import torch


class _Tap(torch.autograd.Function):
    """The identity on a linear's output that hands the output's gradient to `taps` in the backward (and passes it
    on). Its other input, the scalar `tap` that requires grad, puts it in the graph whatever the weights'
    `requires_grad`."""

    @staticmethod
    def forward(ctx, out, tap, taps, name):
        ctx.taps, ctx.name, ctx.tap_dtype = taps, name, tap.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.taps.grads[ctx.name] = grad
        # The gradient goes on to the linears before this one (gate and up behind down_proj, say).
        return grad, torch.zeros((), dtype=ctx.tap_dtype, device=grad.device), None, None


class OutputTaps:
    """d(loss)/d(output) of chosen linears, with no weight gradients and nothing kept beyond what the backward needs.

    A forward hook passes each tapped linear's output through `_Tap` (only while grad mode is on); a backward to
    `tap` then computes only what those outputs' gradients need. The linear's input is kept for the per-window
    product. Use it as a context manager (or call `remove`) so the hooks always come off."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str]):
        self.tap = torch.zeros((), requires_grad=True)
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = [module.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: self._on_forward(n, a[0], o)) for n in names]

    def _on_forward(self, name: str, x: torch.Tensor, out: torch.Tensor):
        if not torch.is_grad_enabled():
            return None
        self.inputs[name] = x
        return _Tap.apply(out, self.tap, self, name)

    def backward(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the backward of `loss`; the tapped outputs' gradients by linear name."""
        self.grads = {}
        torch.autograd.grad(loss, self.tap)
        return self.grads

    def take_inputs(self) -> dict[str, torch.Tensor]:
        """The tapped linears' inputs since the last call, handed over (the taps keep none of them)."""
        inputs, self.inputs = self.inputs, {}
        return inputs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> OutputTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class GradModeSpan:
    """Grad mode on from a forward pre-hook on one module to a forward hook on another (a block that spans
    modules), inside a caller that runs without grad.

    PyTorch has no hook around a module's call, so each span enters a `torch.enable_grad()` in the pre-hook and
    exits it in the forward hook, which restores the caller's mode as a `with` block would. A forward that fails
    between the two leaves its span open: `close` (run in the owner's `finally`) exits every open span."""

    def __init__(self):
        self._open: list = []

    def enter(self) -> None:
        scope = torch.enable_grad()
        scope.__enter__()
        self._open.append(scope)

    def exit(self) -> None:
        self._open.pop().__exit__(None, None, None)

    def close(self) -> None:
        while self._open:
            self.exit()
