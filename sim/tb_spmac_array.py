"""cocotb testbench of the sparse-MAC array: streams a layer's activation beats with random valid gaps,
takes results with random ready back-pressure, and compares every output with the golden model's.

Inputs come from the environment (set by `toolchain.sim.runner`): SPMAC_VECTORS, an .npz with
`beats` [T, passes, BPR, G*M] activation codes, `expected` [T, passes, P] outputs and the layer's `shift`; SPMAC_RESULT, where
the JSON result goes; SPMAC_GAP / SPMAC_STALL, the probabilities of an idle input cycle and of a cycle with
the output not ready; SPMAC_SEED.
"""
from __future__ import annotations

import json
import os
import random
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadOnly, RisingEdge


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


@cocotb.test()
async def stream_layer(dut):
    vectors = np.load(os.environ["SPMAC_VECTORS"])
    beats, expected = vectors["beats"], vectors["expected"]
    act_bits, out_bits = int(vectors["act_bits"]), int(vectors["out_bits"])
    gap, stall = float(os.environ.get("SPMAC_GAP", "0")), float(os.environ.get("SPMAC_STALL", "0"))
    rng = random.Random(int(os.environ.get("SPMAC_SEED", "0")))
    tokens, passes, bpr, _ = beats.shape
    pes = expected.shape[2]

    stream = [(_pack(beats[t, q, b], act_bits), b == bpr - 1)
              for t in range(tokens) for q in range(passes) for b in range(bpr)]
    want = [expected[t, q] for t in range(tokens) for q in range(passes)]

    Clock(dut.clk, 10, unit="ns").start()
    dut.rst_n.value = 0
    dut.s_axis_tvalid.value = 0
    dut.s_axis_tdata.value = 0
    dut.s_axis_tlast.value = 0
    dut.m_axis_tready.value = 0
    dut.cfg_shift.value = int(vectors["shift"])
    await ClockCycles(dut.clk, 3)
    dut.rst_n.value = 1

    sent, got, holding = 0, [], False
    cycles, first, last_out = 0, None, None
    t0 = time.perf_counter()
    limit = 20 * len(stream) + 1000
    while len(got) < len(want) and cycles < limit:
        await RisingEdge(dut.clk)
        cycles += 1
        if sent < len(stream) and (holding or rng.random() >= gap):
            data, last = stream[sent]
            dut.s_axis_tdata.value = data
            dut.s_axis_tlast.value = int(last)
            dut.s_axis_tvalid.value = 1
            valid = True
        else:
            dut.s_axis_tvalid.value = 0
            valid = False
        ready = rng.random() >= stall
        dut.m_axis_tready.value = int(ready)
        await ReadOnly()
        if valid and int(dut.s_axis_tready.value):
            if first is None:
                first = cycles
            sent += 1
            holding = False
        else:
            holding = valid
        if ready and int(dut.m_axis_tvalid.value):
            word = int(dut.m_axis_tdata.value.to_unsigned())
            got.append((_unpack(word, pes, out_bits), int(dut.m_axis_tlast.value)))
            last_out = cycles
    wall = time.perf_counter() - t0

    mismatches, first_bad = 0, None
    for i, (row, tlast) in enumerate(got):
        exp = [int(x) for x in want[i]]
        bad = [p for p in range(pes) if row[p] != exp[p]]
        mismatches += len(bad)
        if bad and first_bad is None:
            first_bad = {"output_beat": i, "pe": bad[0], "got": row[bad[0]], "expected": exp[bad[0]]}
        if tlast != int(i % passes == passes - 1):
            mismatches += 1
            first_bad = first_bad or {"output_beat": i, "tlast": tlast}
    result = {"outputs": len(got) * pes, "expected_outputs": len(want) * pes, "mismatches": mismatches,
              "first_mismatch": first_bad, "cycles": cycles,
              "active_cycles": (last_out - first + 1) if first is not None and last_out is not None else None,
              "beats": len(stream), "err_tlast": int(dut.err_tlast.value), "wall_seconds": round(wall, 3),
              "timed_out": cycles >= limit}
    with open(os.environ["SPMAC_RESULT"], "w") as handle:
        json.dump(result, handle)
    assert not result["timed_out"], f"timed out after {cycles} cycles with {len(got)} of {len(want)} results"
    assert result["err_tlast"] == 0, "the array flagged an input tlast that did not match a pass end"
    assert mismatches == 0, f"{mismatches} outputs differ from the golden model; first: {first_bad}"
