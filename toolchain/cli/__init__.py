"""`toolchain` command line. Thin: parse (`parser.py`, options generated from the job configs), call one `run_*`
of `toolchain.jobs` (`commands.py`), print its summary."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from .. import distributed
from ..errors import ToolchainError
from . import commands
from .parser import build_parser

__all__ = ["build_parser", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`, torchrun ending the other ranks after one failed), raised like an
    interrupt so that every temporary and scratch directory is removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = (signal.signal(signal.SIGTERM, _raise_terminated)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    handler = commands.COMMANDS[args.command]
    try:
        # Under torchrun every rank runs the command; rank 0 alone prints its summary (errors: every rank).
        silent = distributed.env_world_size() > 1 and os.environ.get("RANK", "0") != "0"
        with open(os.devnull, "w") if silent else contextlib.nullcontext() as devnull:
            with contextlib.redirect_stdout(devnull) if silent else contextlib.nullcontext():
                return handler(args)
    except ToolchainError as exc:
        print(f"toolchain {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", "; nothing was written", sep="",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
