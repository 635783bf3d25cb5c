"""torch.nn modules that replace layers of existing models."""

from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, use_adapter_batch

__all__ = ["LoRALinear", "MultiLoRALinear", "use_adapter_batch"]
