"""One config per job: its defaults, its command-line options and its validation, in one place.

Every field that has a flag declares it in this package (`option`), one module per job (`prune`, `quant` with
`compress`, `export`, `recover`) over the calibration and output settings they share (`calibration`); the CLI's
argparse is generated from these declarations, and `validate()` is the one check: it refuses bad values and, for
flags given on the command line, any that the chosen method or mode would ignore.
"""
from .calibration import (CALIB_FIELDS, CALIBRATING, OUTPUT_DTYPES, OUTPUT_FIELDS, STREAMING_HEADROOM, CalibConfig,
                          EvalStreaming, output_dtype, resolve_streaming)
from .export import ACCURACY_LEVELS, ARTIFACT_TARGETS, BUNDLE_TARGETS, LM_HEADS, ONNX_GRAPHS, ExportConfig
from .prune import RECONSTRUCT_MODES, REBUILD_SOLVERS, RESOLVE_MODES, PruneConfig
from .quant import DEFAULT_CANDIDATES, QUANT_METHODS, SENSITIVITIES, QuantConfig, QuantPlan, compress_validate
from .recover import RECOVER_DATA, RecoverConfig

__all__ = ["ACCURACY_LEVELS", "ARTIFACT_TARGETS", "BUNDLE_TARGETS", "CALIB_FIELDS", "CALIBRATING", "DEFAULT_CANDIDATES",
           "LM_HEADS", "ONNX_GRAPHS", "OUTPUT_DTYPES", "OUTPUT_FIELDS", "QUANT_METHODS", "RECONSTRUCT_MODES",
           "REBUILD_SOLVERS", "RECOVER_DATA", "RESOLVE_MODES", "SENSITIVITIES", "STREAMING_HEADROOM", "CalibConfig",
           "EvalStreaming", "ExportConfig", "PruneConfig", "QuantConfig", "QuantPlan", "RecoverConfig",
           "compress_validate", "output_dtype", "resolve_streaming"]
