"""`python -m toolchain.cli ARGS`: how the benchmarks and `reference_runs` start a job in its own process."""
import sys

from . import main

sys.exit(main())
