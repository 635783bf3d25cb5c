"""BitFit (Ben Zaken et al., 2022): train only the bias terms of the model, and its task head.

Biases are found by rule: every parameter whose own name is ``bias``, in any module. The task head
is a classification head the model has under one of the usual names (``TASK_HEAD_NAMES``) and any
module named in ``modules_to_train``; a causal LM's vocabulary projection is not a task head and
stays frozen unless named. The checkpoint holds the trained tensors under the model's own
parameter names (see :mod:`fastpeft.methods.full_finetune`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..targeting import find_named_modules, name_matches, own_modules
from .base import MethodConfig, register
from .full_finetune import SelectiveMethod, own_parameters, parameters_under

# Names transformers gives the classification heads of its *ForSequenceClassification,
# *ForTokenClassification and *ForQuestionAnswering models.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


@dataclass
class BitFitConfig(MethodConfig):
    """modules_to_train: modules (names or name suffixes) trained fully beside the biases.
    train_task_head: also train the model's classification head when it has one (see TASK_HEAD_NAMES)."""

    peft_type = "BITFIT"
    modules_to_train: list[str] | None = None
    train_task_head: bool = True


def bias_names(model: nn.Module) -> list[str]:
    return [n for n in own_parameters(model) if n.rpartition(".")[2] == "bias"]


def task_heads(model: nn.Module) -> list[str]:
    return [n for n, _ in own_modules(model) if n and name_matches(n, TASK_HEAD_NAMES)]


@register
class BitFit(SelectiveMethod):
    config_cls = BitFitConfig

    def trained_names(self, model: nn.Module, config: BitFitConfig) -> list[str]:
        biases = bias_names(model)
        if not biases:
            raise ValueError(f"BitFit trains bias terms, and {type(model).__name__} has none (its layers were built "
                             "with bias=False, as in Llama-style models); use another method (LoRA, (IA)3, "
                             "layer freezing) or a model with biases")
        heads = find_named_modules(model, config.modules_to_train, "BitFitConfig.modules_to_train")
        if config.train_task_head:
            heads += [h for h in task_heads(model) if h not in heads]
        head_params = parameters_under(model, heads)
        return biases + [n for n in head_params if n not in biases]
