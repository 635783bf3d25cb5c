"""fastpeft: fused kernels for parameter-efficient fine-tuning.

    import fastpeft
    from fastpeft.nn import LoRALinear
    layer = LoRALinear.from_linear(torch.nn.Linear(4096, 4096), r=16, lora_alpha=32)
    fastpeft.ops.lora_linear(x, W, bias, A, B, scaling)
    with fastpeft.use_backend("torch"): ...   # force the pure-PyTorch reference

See :mod:`fastpeft.backends` for the backends and how one is chosen.
"""

__version__ = "0.1.0"

from . import backends, nn, ops
from .backends import BackendUnavailable, use_backend

ops._registry.load_faces()

from . import icl  # noqa: E402
from .checkpoint import CheckpointError, load_adapter, save_adapter  # noqa: E402
from .config import LoraConfig  # noqa: E402
from .methods.bitfit import BitFitConfig  # noqa: E402
from .methods.bottleneck import BottleneckConfig  # noqa: E402
from .methods.compacter import CompacterConfig  # noqa: E402
from .methods.diff_pruning import DiffPruningConfig  # noqa: E402
from .methods.full_finetune import FullFinetuneConfig  # noqa: E402
from .methods.ia3 import IA3Config  # noqa: E402
from .methods.layer_freezing import LayerFreezingConfig  # noqa: E402
from .methods.prefix_tuning import PrefixTuningConfig  # noqa: E402
from .methods.prompt_tuning import PromptTuningConfig  # noqa: E402
from .methods import (add_adapter, delete_adapter, disable_adapters, from_peft, get_peft_model,  # noqa: E402
                      merge_and_unload, print_trainable_parameters, set_adapter)
from .pool import AdapterPool  # noqa: E402
from .quantize import load_quantized_model, quantize_model, save_quantized_model  # noqa: E402
from .distributed import shard_model  # noqa: E402

__all__ = ["ops", "nn", "icl", "backends", "use_backend", "BackendUnavailable", "__version__",
           "get_peft_model", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "merge_and_unload",
           "from_peft", "print_trainable_parameters", "save_adapter", "load_adapter", "CheckpointError", "AdapterPool",
           "quantize_model", "load_quantized_model", "save_quantized_model", "shard_model",
           # one config per method
           "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "IA3Config", "BottleneckConfig", "CompacterConfig",
           "BitFitConfig", "DiffPruningConfig", "LayerFreezingConfig", "FullFinetuneConfig"]
