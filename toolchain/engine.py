"""The layer-by-layer engine shared by every pruning (and later quantization) method.

It embeds the calibration windows once, captures what the model passes to its first decoder layer
(hidden states plus keyword arguments such as RoPE tables and masks), then walks the decoder layers one
at a time: gather statistics with hooks, let a method rewrite the weights, and recompute the layer's
outputs as the next layer's inputs. Memory: the model (on the CPU when a GPU is used), one layer on the
device, and two [N, T, d] activation buffers. With a `stream` (`models/streaming.py: StreamingCheckpoint`) the
model is a meta-device skeleton: the walk loads each layer from the checkpoint when it reaches it, hands the
processed layer to a `sink` (the output's shard writer) and returns it to `meta`, so only that layer is held.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .machine import memory_line, peak_cuda_mib, peak_rss_mib, proc_status_mib
from .models.base import ArchAdapter, SubBlock, first_tensor
from .input_stats import InputStats


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once the wanted activations are captured."""


@torch.no_grad()
def set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Write new weights into the existing tensor: a checkpoint loaded by memory map then turns its pages
    into the process's own copy-on-write pages, instead of holding the old (file) and new copies at once."""
    linear.weight.data.copy_(weight)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LayerEngine:
    def __init__(self, model: nn.Module, adapter: ArchAdapter, calib_ids: torch.Tensor, batch_size: int = 8,
                 device: torch.device | str | None = None, stream=None):
        if calib_ids.dim() != 2:
            raise ValueError(f"calibration ids must be [samples, seqlen], got {tuple(calib_ids.shape)}")
        self.model = model
        self.adapter = adapter
        self.layers = adapter.decoder_layers(model)
        self.calib_ids = calib_ids
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device) if device is not None else default_device()
        self.layer_kwargs: dict = {}
        self.stream = stream      # load_layer(i) / free_layer(i), or None when the whole model is in memory

    # ---------------------------------------------------------------- batching and layer calls
    def batches(self, n: int | None = None, size: int | None = None) -> Iterator[slice]:
        n = self.calib_ids.shape[0] if n is None else n
        size = self.batch_size if size is None else max(1, size)
        for start in range(0, n, size):
            yield slice(start, min(start + size, n))

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return first_tensor(layer(hidden, **self.layer_kwargs))

    @torch.no_grad()
    def forward_layer(self, layer: nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run `layer` on every calibration window (batched); returns `out` ([N, T, d])."""
        out = torch.empty_like(hidden) if out is None else out
        for s in self.batches():
            out[s] = self.call_layer(layer, hidden[s])
        return out

    # ---------------------------------------------------------------- first-layer inputs
    def _move_outside_layers(self, device: torch.device) -> None:
        inside = {id(t) for t in list(self.layers.parameters()) + list(self.layers.buffers())}
        for module in self.model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) not in inside and not param.is_meta:
                    param.data = param.data.to(device)
            for key, buf in list(module._buffers.items()):
                if buf is not None and id(buf) not in inside and not buf.is_meta:
                    module._buffers[key] = buf.to(device)

    @torch.no_grad()
    def capture_inputs(self) -> torch.Tensor:
        """Hidden states entering decoder layer 0 for every window: float32 [N, T, d] on the device."""
        first = self.layers[0]
        captured: list[torch.Tensor] = []
        engine = self

        class Catcher(nn.Module):
            def __init__(self):
                super().__init__()
                # Some families pick a mask per layer by this attribute (sliding vs full attention).
                if hasattr(first, "attention_type"):
                    self.attention_type = first.attention_type

            def forward(self, hidden_states, *args, **kwargs):
                captured.append(hidden_states)
                if not engine.layer_kwargs:
                    engine.layer_kwargs = {k: v for k, v in kwargs.items()
                                           if k not in ("past_key_values", "past_key_value", "cache", "use_cache",
                                                        "output_attentions")}
                raise _StopForward

        if self.stream is not None:
            self.stream.load_embeddings()
        self._move_outside_layers(self.device)
        self.layers[0] = Catcher()
        try:
            # One window per call: every window gets identical masks and positions (no padding), so the
            # keyword arguments captured with batch 1 broadcast over any batch later.
            for i in range(self.calib_ids.shape[0]):
                with contextlib.suppress(_StopForward):
                    self.model(self.calib_ids[i:i + 1].to(self.device), use_cache=False)
        finally:
            self.layers[0] = first
            if self.device.type != "cpu":
                self._move_outside_layers(torch.device("cpu"))
            if self.stream is not None:
                self.stream.release_embeddings()
        return torch.cat(captured, dim=0).float()

    # ---------------------------------------------------------------- the walk
    def walk(self, process: Callable[[int, nn.Module, torch.Tensor | None], dict | tuple[dict, torch.Tensor]],
             needs_inputs: bool = True, desc: str = "", progress: bool = True,
             sink: Callable[[int, nn.Module], None] | None = None) -> list[dict]:
        """Call `process(i, layer, hidden)` for every decoder layer in order, with the layer on the device and
        `hidden` its inputs from the already-processed layers; then run the processed layer to make the next
        layer's inputs, unless `process` returned them already as `(entry, outputs)`, and hand the layer, now
        final, to `sink(i, layer)`. Returns the per-layer entries (`process`'s dict plus index and seconds)."""
        hidden = self.capture_inputs() if needs_inputs else None
        spare = None  # a second activation buffer, made on first use (Barber hands over its own outputs)
        entries = []
        bar = tqdm(range(len(self.layers)), desc=desc, disable=not progress or not distributed.world().is_writer,
                   unit="layer")
        for i in bar:
            start = time.perf_counter()
            layer = self.stream.load_layer(i) if self.stream is not None else self.layers[i]
            layer.to(self.device)
            result = process(i, layer, hidden)
            outputs = None
            if isinstance(result, tuple):
                result, outputs = result
            entry = {"layer": i, **result}
            if outputs is not None:
                hidden = outputs
            elif hidden is not None and i + 1 < len(self.layers):
                hidden, spare = self.forward_layer(layer, hidden, spare), hidden
            if sink is not None:
                sink(i, layer)
            if self.stream is not None:
                self.stream.free_layer(i)
            else:
                layer.to("cpu")
            entry["seconds"] = round(time.perf_counter() - start, 3)
            # After each layer: whether the peak is set by one layer's work (flat in depth) or grows with depth.
            anon, cuda = proc_status_mib("RssAnon"), peak_cuda_mib()
            entry["memory_mib"] = {"peak_rss": round(peak_rss_mib(), 1),
                                   **({"anon_after": round(anon, 1)} if anon is not None else {}),
                                   **({"peak_cuda": round(cuda, 1)} if cuda is not None else {})}
            entries.append(entry)
            bar.set_postfix_str(memory_line(), refresh=False)
        return entries

    # ---------------------------------------------------------------- statistics
    @torch.no_grad()
    def collect_stats(self, layer: nn.Module, hidden: torch.Tensor, hessian: bool,
                      only: tuple[str, ...] | None = None) -> dict[str, InputStats]:
        """Input statistics for every linear of `layer` (or only the input groups holding a linear named in
        `only`); linears that read the same tensor share one object."""
        stats: dict[str, InputStats] = {}
        handles = []
        for group in self.adapter.input_groups():
            if only is not None and not set(group) & set(only):
                continue
            module = layer.get_submodule(group[0])
            shared = InputStats(module.in_features, hessian=hessian, device=self.device)
            for name in group:
                stats[name] = shared
            handles.append(module.register_forward_pre_hook(lambda m, args, st=shared: st.add_batch(args[0])))
        try:
            for s in self.batches():
                self.call_layer(layer, hidden[s])
        finally:
            for h in handles:
                h.remove()
        # Under torch.distributed each rank saw its own windows: sum the parts so every rank holds the
        # statistics of all windows (one process: nothing happens).
        for shared in {id(st): st for st in stats.values()}.values():
            (shared.tokens,) = distributed.all_reduce_sums([shared.sq_sum, shared.xtx], [shared.tokens])
        return stats

    def capture_block(self, layer: nn.Module, hidden: torch.Tensor, block: SubBlock):
        """Run `layer` on one batch until `block` has run; return its entry (args, kwargs) and its output."""
        seen: dict = {}

        def on_entry(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs

        def on_exit(module, args, output):
            seen["out"] = first_tensor(output)
            raise _StopForward

        entry = layer.get_submodule(block.entry).register_forward_pre_hook(on_entry, with_kwargs=True)
        exit_ = layer.get_submodule(block.exit).register_forward_hook(on_exit)
        try:
            with torch.no_grad(), contextlib.suppress(_StopForward):
                self.call_layer(layer, hidden)
        finally:
            entry.remove()
            exit_.remove()
        return seen["args"], seen["kwargs"], seen["out"]
