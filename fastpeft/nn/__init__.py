"""torch.nn modules that replace layers of existing models."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
