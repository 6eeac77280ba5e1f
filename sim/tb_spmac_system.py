"""cocotb testbench of the DRAM-fed system (`spmac_system`), with cocotbext-axi's models.

DRAM is cocotbext-axi's `AxiRamRead` holding the DRAM image, with a random read latency per burst (counted
from the burst's AR handshake, so bursts in flight overlap their latencies as in a pipelined memory
controller), random AR acceptance and random R stalls. Activations go in through an `AxiStreamSource`
(one frame per token and layer), results come out through an `AxiStreamSink` (one frame per token and
layer: tlast on the last row pass). The run is started once; the sequencer walks every layer alone.

Inputs come from the environment (set by `toolchain.sim.dram_sim`): SPMAC_VECTORS, an .npz with the image,
the table address, per layer `acts_<i>` [T, K] codes and `expected_<i>` [T, passes*P] outputs;
SPMAC_RESULT, the JSON result; SPMAC_MEMORY, a JSON object of the memory's behaviour (latency range,
AR/R stall probabilities, or a fixed R duty cycle); SPMAC_GAP / SPMAC_STALL, the probabilities of an idle
activation cycle and of a result cycle without ready; SPMAC_SEED.
"""
from __future__ import annotations

import collections
import json
import os
import random
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge
from cocotbext.axi import AxiRamRead, AxiReadBus, AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource


def _pack(values: np.ndarray, width: int) -> int:
    out = 0
    for i, v in enumerate(values.tolist()):
        out |= (int(v) & ((1 << width) - 1)) << (i * width)
    return out


def _unpack(word: int, count: int, width: int) -> list[int]:
    out = []
    for i in range(count):
        v = (word >> (i * width)) & ((1 << width) - 1)
        out.append(v - (1 << width) if v >> (width - 1) else v)
    return out


class LatentAxiRam(AxiRamRead):
    """AxiRamRead whose bursts return no earlier than a random latency after their AR handshake."""

    def __init__(self, dut, latency: tuple[int, int], rng: random.Random, **kwargs):
        super().__init__(AxiReadBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst_n, reset_active_level=False,
                         **kwargs)
        self.dut, self.latency, self.rng = dut, latency, rng
        self.cycle = 0
        self.accepted = collections.deque()      # (ready cycle, beats) of each burst, in order
        self.beats_left = 0
        self.most_in_flight = 0                  # bursts accepted and not yet returning, at most
        cocotb.start_soon(self._watch_ar())

    async def _watch_ar(self):
        while True:
            await RisingEdge(self.dut.clk)
            self.cycle += 1
            if int(self.dut.m_axi_arvalid.value) and int(self.dut.m_axi_arready.value):
                ready = self.cycle + self.rng.randint(*self.latency)
                self.accepted.append((ready, int(self.dut.m_axi_arlen.value) + 1))
                self.most_in_flight = max(self.most_in_flight, len(self.accepted) + (self.beats_left > 0))

    async def _read(self, address, length):
        if self.beats_left == 0 and self.accepted:       # the first beat of the next burst
            ready, self.beats_left = self.accepted.popleft()
            while self.cycle < ready:
                await RisingEdge(self.dut.clk)
        self.beats_left = max(0, self.beats_left - 1)
        return await super()._read(address, length)


def _random_pause(rng: random.Random, p: float):
    while True:
        yield rng.random() < p


def _duty_pause(on: int, period: int):
    while True:
        for i in range(period):
            yield i >= on


@cocotb.test()
async def run_layers(dut):
    vectors = np.load(os.environ["SPMAC_VECTORS"])
    memory = json.loads(os.environ.get("SPMAC_MEMORY", "{}"))
    gap, stall = float(os.environ.get("SPMAC_GAP", "0")), float(os.environ.get("SPMAC_STALL", "0"))
    rng = random.Random(int(os.environ.get("SPMAC_SEED", "0")))
    layers, tokens = int(vectors["layers"]), int(vectors["tokens"])
    act_bits, out_bits, pes = int(vectors["act_bits"]), int(vectors["out_bits"]), int(vectors["pes"])
    beat_k = int(vectors["beat_k"])
    image = vectors["image"].tobytes()

    Clock(dut.clk, 10, unit="ns").start()
    dut.rst_n.value = 0
    dut.start_valid.value = 0
    dut.start_table.value = int(vectors["table"])
    dut.start_layers.value = layers
    dut.start_tokens.value = tokens

    ram = LatentAxiRam(dut, tuple(memory.get("latency", (1, 1))), rng, size=len(image))
    ram.write(0, image)
    ram.ar_channel.queue_occupancy_limit = 16            # the controller takes addresses ahead of the data
    if memory.get("r_duty"):                              # a slow memory: R valid `on` cycles of every `period`
        ram.r_channel.set_pause_generator(_duty_pause(*memory["r_duty"]))
    elif memory.get("r_stall"):
        ram.r_channel.set_pause_generator(_random_pause(rng, memory["r_stall"]))
    if memory.get("ar_stall"):
        ram.ar_channel.set_pause_generator(_random_pause(rng, memory["ar_stall"]))

    source = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis"), dut.clk, dut.rst_n, reset_active_level=False)
    sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis"), dut.clk, dut.rst_n, reset_active_level=False)
    if gap:
        source.set_pause_generator(_random_pause(rng, gap))
    if stall:
        sink.set_pause_generator(_random_pause(rng, stall))

    await ClockCycles(dut.clk, 3)
    dut.rst_n.value = 1
    await ClockCycles(dut.clk, 2)
    # frames are queued after reset: a source drives nothing while its reset is asserted
    beat_bytes = len(dut.s_axis_tdata) // 8
    want = []
    for i in range(layers):
        acts = vectors[f"acts_{i}"]
        for t in range(tokens):
            beats = acts[t].reshape(-1, beat_k)
            source.send_nowait(AxiStreamFrame(b"".join(_pack(b, act_bits).to_bytes(beat_bytes, "little")
                                                       for b in beats)))
        want.append(vectors[f"expected_{i}"])
    dut.start_valid.value = 1
    await RisingEdge(dut.clk)
    while not int(dut.start_ready.value):
        await RisingEdge(dut.clk)
    dut.start_valid.value = 0
    started = ram.cycle

    limit = int(vectors["cycle_limit"])
    t0 = time.perf_counter()
    done_at, cycles, last_result = None, 0, 0
    while cycles < limit:
        await RisingEdge(dut.clk)
        await ReadOnly()
        cycles += 1
        if int(dut.done.value):
            done_at = ram.cycle
            break
        if int(dut.m_axis_tvalid.value) and int(dut.m_axis_tready.value):
            last_result = cycles
        # a refused descriptor stops the run: the layers before it finish, then nothing moves
        if int(dut.err.value) & 0b1000 and cycles - last_result > 500:
            break
    await ClockCycles(dut.clk, 4)                          # the last result leaves the skid buffer
    wall = time.perf_counter() - t0

    out_word = len(dut.m_axis_tdata) // 8
    frames = []
    while not sink.empty():
        frames.append(sink.recv_nowait().tdata)
    mismatches, first_bad, got_outputs = 0, None, 0
    per_layer = []
    for i in range(layers):
        bad_layer = 0
        for t in range(tokens):
            index = i * tokens + t
            if index >= len(frames):
                bad_layer += want[i].shape[1]
                continue
            frame = bytes(frames[index])
            got = [v for b in range(0, len(frame), out_word)
                   for v in _unpack(int.from_bytes(frame[b:b + out_word], "little"), pes, out_bits)]
            got_outputs += len(got)
            exp = want[i][t].tolist()
            if len(got) != len(exp):
                bad_layer += abs(len(exp) - len(got)) + 1
                first_bad = first_bad or {"layer": i, "token": t, "outputs": len(got), "expected": len(exp)}
                continue
            wrong = [r for r in range(len(exp)) if got[r] != exp[r]]
            bad_layer += len(wrong)
            if wrong and first_bad is None:
                first_bad = {"layer": i, "token": t, "row": wrong[0], "got": got[wrong[0]], "expected": exp[wrong[0]]}
        per_layer.append(bad_layer)
        mismatches += bad_layer
    result = {"outputs": got_outputs, "expected_outputs": int(sum(w.size for w in want)), "mismatches": mismatches,
              "mismatches_per_layer": per_layer, "first_mismatch": first_bad, "frames": len(frames),
              "cycles": (done_at - started) if done_at is not None else None, "timed_out": done_at is None,
              "rd_beats": int(dut.rd_beats.value),
              "most_bursts_in_flight": ram.most_in_flight, "err": int(dut.err.value), "wall_seconds": round(wall, 3)}
    with open(os.environ["SPMAC_RESULT"], "w") as handle:
        json.dump(result, handle)
