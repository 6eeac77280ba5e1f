"""The artifact list every export directory carries: each file's path, size and sha256."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_artifacts(root: Path) -> list[dict]:
    """Every file under `root`, in path order, relative to it."""
    return [{"path": str(f.relative_to(root)), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(p for p in root.rglob("*") if p.is_file())]
