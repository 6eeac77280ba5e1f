"""`toolchain gpu-bench`: dense fp16 against 2:4 semi-structured linears, honestly labelled.

- `specs`: vendor peak figures per GPU (`GPUS`), the fp16 and 2:4 storage formats, the token counts and target.
- `shapes`: the distinct linear shapes of a model's decoder.
- `estimate`: the roofline ESTIMATE from vendor peaks, `max(FLOPs / peak, bytes / bandwidth)`.
- `measure`: the MEASUREMENT on a CUDA device.
- `report`: the markdown tables and the plot; `run`: the command, `run_gpu_bench`.
"""
from .measure import NoCudaError, measure_cuda
from .report import gpu_table
from .estimate import estimate_rows, roofline, weight_bytes
from .run import run_gpu_bench
from .shapes import linear_shapes
from .specs import GPUS, TOKENS, GPUSpec, get_gpu, match_gpu

__all__ = ["GPUS", "GPUSpec", "NoCudaError", "TOKENS", "get_gpu", "match_gpu", "linear_shapes", "weight_bytes",
           "roofline", "estimate_rows", "measure_cuda", "run_gpu_bench", "gpu_table"]
