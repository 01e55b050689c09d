"""ClipCap on ONNX Runtime: export a model to ONNX graphs (`export_onnx`) and caption with them (`OnnxCaptioner`).

Needs the `onnx` extra (onnx, onnxscript, onnxruntime); `import clipcap_hf` never imports this package.
"""

from .export import GRAPHS, export_onnx
from .runtime import OnnxCaptioner, caption_agreement

__all__ = ["GRAPHS", "OnnxCaptioner", "caption_agreement", "export_onnx"]
