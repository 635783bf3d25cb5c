"""torch.nn modules that replace layers of existing models."""

from .linear4bit import Linear4bit, load_quantized_model, quantize_model, save_quantized_model
from .lora import LoRALinear, QLoRALinear
from .multi_lora import MultiLoRALinear, use_adapter_batch
from .phm import PHMLinear

__all__ = ["LoRALinear", "QLoRALinear", "Linear4bit", "MultiLoRALinear", "PHMLinear", "quantize_model",
           "load_quantized_model",
           "save_quantized_model", "use_adapter_batch"]
