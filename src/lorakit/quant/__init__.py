"""4-bit (NF4 / FP4) quantization with double quantization, byte-exact with bitsandbytes.

Modules: dynamic (8-bit dynamic blockwise codes), nf4 (4-bit quantize/dequantize),
state (QuantState and its safetensors form), linear4bit (Linear4bit layer), report
(quantization-quality report).
"""

from .dynamic import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from .linear4bit import Linear4bit
from .nf4 import FP4_CODE, NF4_CODE, dequantize_4bit, quantize_4bit
from .state import QuantState

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "Linear4bit",
    "QuantState",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_blockwise",
]
