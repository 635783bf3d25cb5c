"""Quantised weights: NF4 in bitsandbytes' format."""

from .nf4 import NF4Weight, dequantize_nf4, dynamic_map, empty_nf4, nf4_code, nf4_from_state_dict, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4", "dequantize_nf4", "nf4_from_state_dict", "nf4_code", "dynamic_map", "empty_nf4"]
