"""What a measurement depends on and how much memory a run takes: library versions, the machine, and the
process's memory (recorded in compression.json and in benchmark rows)."""
from __future__ import annotations

import platform
import resource
import threading
from pathlib import Path

import torch

from . import __version__


def library_versions() -> dict:
    import numpy
    import transformers

    return {"toolchain": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def blas_kernels() -> str | None:
    """The kernel family of each BLAS loaded once scipy's LAPACK is (OpenBLAS picks it from the CPU, and two
    machines with the same CPU name can get different ones), e.g. "openblas Haswell"; None where threadpoolctl
    sees none."""
    try:
        import scipy.linalg  # noqa: F401  (loads the BLAS, so threadpoolctl can see it)
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    found = sorted({f"{i.get('internal_api')} {i.get('architecture')}" for i in threadpool_info()
                    if i.get("user_api") == "blas"})
    return ", ".join(found) or None


def machine_description() -> dict:
    """What a timing (and, through kernel choice, float rounding) depends on: the CPU, the vector extensions
    PyTorch dispatches to, the threads it uses, and the kernels of the BLAS behind scipy (the inverse Hessian
    factor runs there, toolchain/numerics/hessian.py)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "blas": blas_kernels(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def proc_status_mib(field: str) -> float | None:
    """A kB field of /proc/self/status in MiB, or None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class AnonPeak:
    """Samples the process's anonymous resident memory (RssAnon) every 20 ms while active.

    Peak RSS (VmHWM) also counts the clean, file-backed pages of the memory-mapped input checkpoint, which
    are page cache the kernel can drop; RssAnon is the memory the process itself allocated."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read_mib() -> float:
        return proc_status_mib("RssAnon") or 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.read_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.read_mib())


_LIBC_TRIM = None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's `malloc_trim`); returns whether it could.

    A streamed walk frees each layer's tensors, but tensors below glibc's mmap threshold (which grows to 32 MiB
    once a large block is freed) live in the heap, and the few small blocks still live between the freed ones
    keep glibc from shrinking it: the resident set then grows layer after layer although nothing is leaked.
    Trimming after each layer keeps the peak per-layer (docs/scale.md has the measurement)."""
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):     # not glibc (macOS, musl): nothing to trim this way
            _LIBC_TRIM = False
    if _LIBC_TRIM is False:
        return False
    _LIBC_TRIM(0)
    return True


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives fork+exec, so a
    child started by a big parent would report the parent's peak."""
    hwm = proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def available_ram_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_cuda_mib() -> float | None:
    """Peak CUDA memory allocated by this process's tensors, or None when CUDA was not used."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def memory_line() -> str:
    """The progress line's memory facts: peak RSS and, on CUDA, peak device memory."""
    cuda = peak_cuda_mib()
    return f"peak RSS {peak_rss_mib():.0f} MiB" + (f", CUDA {cuda:.0f} MiB" if cuda is not None else "")
