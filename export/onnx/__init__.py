"""ONNX export of a whole decoder LM with a KV cache, in three weight forms (float, qdq, matmulnbits).

- `graph`: the graph under construction (nodes, initializers, constants) and the decoder's dimensions;
- `weights`: each linear's weight form (`LinearWriter`), the embedding's lossless int8 storage;
- `decoder`: the plain decoder graph (op by op), one builder for every family, laid out by the family's adapter;
- `fused`: the fused decoder graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, stacked projections);
- `genai`: genai_config.json and the tokenizer beside a graph, for onnxruntime-genai;
- `external`: `ExternalData`, the weights file a streamed export writes initializer by initializer;
- `build`: `build_onnx` (a loaded model to a ModelProto), `save_onnx`, `build_streamed` (a checkpoint to a graph
  and its weights file, one decoder layer at a time), `export_onnx` (a model directory).
"""
from .build import EXTERNAL_DATA_BYTES, GRAPHS, build_onnx, export_onnx, save_onnx
from .decoder import DecoderGraph
from .graph import MS_DOMAIN, OPSET, Dims, Graph
from .weights import FORMS, ExportWarning, LinearWriter, lossless_int8_blocks, matmulnbits_widths

__all__ = ["GRAPHS", "build_onnx", "export_onnx", "save_onnx", "EXTERNAL_DATA_BYTES", "DecoderGraph", "Dims", "Graph",
           "OPSET", "MS_DOMAIN", "FORMS", "ExportWarning", "LinearWriter", "lossless_int8_blocks",
           "matmulnbits_widths"]
