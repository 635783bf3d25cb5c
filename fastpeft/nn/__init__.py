"""torch.nn modules that replace layers of existing models."""

from .linear4bit import Linear4bit, quantize_model
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, use_adapter_batch

__all__ = ["LoRALinear", "Linear4bit", "MultiLoRALinear", "quantize_model", "use_adapter_batch"]
