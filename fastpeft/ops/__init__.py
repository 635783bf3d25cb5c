"""Functional ops of fastpeft; each is also a registered ``torch.ops.fastpeft.*`` operator.

The op objects (``lora_linear_fwd``...) are the single dispatch point: calling one validates its
inputs and runs the best usable face (see :mod:`fastpeft.backends`); :func:`record_faces` tells
which face each call took.
"""

from . import _registry
from .adapter_batch import AdapterBatch
from .adapter_block import adapter_block, adapter_block_bwd, adapter_block_fwd
from .bgmv import bgmv_expand, bgmv_shrink
from .dense_linear import dense_linear
from .dora_linear import dora_linear, dora_linear_bwd, dora_linear_fwd
from .lora_linear import lora_linear, lora_linear_bwd, lora_linear_fwd
from .nf4_matmul import nf4_matmul
from .phm_linear import phm_linear, phm_linear_bwd, phm_linear_fwd
from .sgmv import sgmv_expand, sgmv_outer, sgmv_shrink

all_ops = _registry.all_ops
record_faces = _registry.record_faces
Compare = _registry.Compare

__all__ = ["dense_linear", "lora_linear", "lora_linear_fwd", "lora_linear_bwd", "dora_linear", "dora_linear_fwd",
           "dora_linear_bwd", "bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand", "sgmv_outer",
           "nf4_matmul", "phm_linear", "phm_linear_fwd", "phm_linear_bwd", "adapter_block",
           "adapter_block_fwd", "adapter_block_bwd", "AdapterBatch", "all_ops", "record_faces", "Compare"]
