"""Weight quantization: the integer grid, RTN, GPTQ, APTQ's attention Hessians and bit allocation, and the
quant_state file."""
from .gptq import gptq_quantize
from .quantizer import SUPPORTED_BITS, QuantizedWeight, QuantSpec, dequantize, fit_params, quantize_codes
from .rtn import rtn_quantize
from .state import QuantStateFile, read_quant_state, write_quant_state

__all__ = ["QuantSpec", "QuantizedWeight", "SUPPORTED_BITS", "dequantize", "fit_params", "quantize_codes",
           "rtn_quantize", "gptq_quantize", "read_quant_state", "write_quant_state",
           "QuantStateFile"]
