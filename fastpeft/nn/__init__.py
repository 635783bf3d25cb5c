"""torch.nn modules that replace layers of existing models. They know nothing of models, methods
or checkpoints: whole-model actions live in :mod:`fastpeft.targeting`, :mod:`fastpeft.methods` and
:mod:`fastpeft.quantize`."""

from .dense import DenseLinear
from .linear4bit import Linear4bit
from .lora import LoRALinear, QLoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .multi_lora import MultiLoRALinear, use_adapter_batch
from .phm import PHMLinear

__all__ = ["DenseLinear", "LoRALinear", "QLoRALinear", "Linear4bit", "MultiLoRALinear", "PHMLinear",
           "ModulesToSaveWrapper", "use_adapter_batch"]
