"""Diff pruning (Guo et al., 2021): learn a sparse delta for each targeted parameter, W = W0 + z ⊙ δ,
where z is a hard-concrete L0 gate (Louizos et al., 2018) per element and a penalty on the expected
number of open gates drives the delta to a sparsity target.

Usage::

    model = fastpeft.get_peft_model(model, fastpeft.DiffPruningConfig(target_sparsity=0.99))
    opt = torch.optim.AdamW(diff_pruning.param_groups(model, lr=5e-3))   # gates at their own rate
    for batch in data:
        loss = model(**batch).loss + diff_pruning.l0_penalty(model)     # the regulariser to add
        ...
    model.eval()                                   # deterministic gates, projected to the target
    result = diff_pruning.export_sparse_delta(model)  # {parameter: delta}, result.sparsity

In training each forward samples the gates (the reparameterised hard-concrete distribution); in
eval the gate is deterministic, ẑ = clamp(sigmoid(log α)(ζ − γ) + γ, 0, 1), and where more than
the target fraction of entries is still open, only the largest |ẑ δ| are kept (Guo et al.'s
magnitude projection onto the L0 ball, per parameter), so the exported delta meets its sparsity
target exactly. The penalty's gradient spares each parameter's budget of entries with the largest
P(open) |δ|, which the task alone moves (:func:`l0_penalty` says why). The deltas live in
``torch.nn.utils.parametrize`` parametrizations of the targeted parameters; the original weights
stay frozen and untouched. The checkpoint holds, per targeted
parameter ``<module>.<param>``, the keys ``<module>.<param>.delta`` and ``<module>.<param>.log_alpha``
(float32): everything the eval-mode model is computed from. Modules trained whole
(``modules_to_save`` and the task_type's head, as in PEFT; see :mod:`fastpeft.methods.heads`) get
no delta; their trained copy is saved as ``<module>.<param>``. A fresh classifier head needs this:
as a gated delta on its random weights it closed with the other gates and evaluated as initialised
(MiniLM sentiment in ``fastpeft compare``: 0.515, chance 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..nn.linear4bit import Linear4bit
from ..nn.modules_to_save import ModulesToSaveWrapper
from ..targeting import name_matches, own_modules, replace_module, resolve_target_modules
from .base import Method, MethodConfig, forget_adapters, register
from .heads import find_heads, heads_shapes, heads_state_dict, wrap_heads


@dataclass
class DiffPruningConfig(MethodConfig):
    """target_modules: as in :class:`fastpeft.LoraConfig` (regex string, list of names / name
        suffixes, or ``"all-linear"``); every parameter of a matched module gets a delta.
    target_sparsity: the fraction of delta entries that are zero after training.
    l0_lambda: weight of the L0 penalty, per expected open gate above the target.
    gate_lr: learning rate of the gate parameters (log α) in :func:`param_groups`; they have to
        travel several units, faster than the deltas. None: the deltas' rate.
    init_log_alpha: initial log α (the gates start mostly open).
    temperature, stretch: the hard-concrete distribution's β and (γ, ζ), Louizos et al.'s values.
    modules_to_save: modules trained whole (a trainable copy each, saved with the deltas under
        ``<module>.<param>``), no delta inside them; task_type SEQ_CLS / TOKEN_CLS / QUESTION_ANS adds
        the task's head, as PEFT does (see :mod:`fastpeft.methods.heads`)."""

    peft_type = "DIFF_PRUNING"
    target_modules: list[str] | str = "all-linear"
    target_sparsity: float = 0.99
    l0_lambda: float = 10.0
    gate_lr: float | None = 0.1
    init_log_alpha: float = 2.0
    temperature: float = 2 / 3
    stretch: list[float] = field(default_factory=lambda: [-0.1, 1.1])
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"DiffPruningConfig: target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.l0_lambda < 0:
            raise ValueError(f"DiffPruningConfig: l0_lambda must be >= 0, got {self.l0_lambda}")
        if self.temperature <= 0:
            raise ValueError(f"DiffPruningConfig: temperature must be > 0, got {self.temperature}")
        low, high = self.stretch
        if not (low < 0 and high > 1):
            raise ValueError(f"DiffPruningConfig: stretch (γ, ζ) must have γ < 0 < 1 < ζ, got {self.stretch}")
        self.stretch = [float(low), float(high)]


class HardConcreteDelta(nn.Module):
    """Parametrization W -> W + z ⊙ δ of one parameter; δ and log α float32 of W's shape."""

    def __init__(self, like: torch.Tensor, config: DiffPruningConfig):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        self.log_alpha = nn.Parameter(torch.full(like.shape, float(config.init_log_alpha), dtype=torch.float32,
                                                 device=like.device))
        self.temperature = config.temperature
        self.low, self.high = config.stretch
        self.target_sparsity = config.target_sparsity
        self._mask_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def sampled_gate(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic_gate(self, project: bool = True) -> torch.Tensor:
        """ẑ, with entries beyond the sparsity target's budget closed (largest |ẑ δ| kept) if `project`."""
        gate = (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)
        # on the meta device (a model built before its weights are loaded) only the shape is known
        return gate * self._projection_mask(gate) if project and not gate.is_meta else gate

    def _apply(self, fn, recurse=True):
        self._mask_cache = None  # .to()/.double() swap the tensors in at version 0: the key would not see it
        return super()._apply(fn, recurse)

    def _projection_mask(self, gate: torch.Tensor) -> torch.Tensor:
        key = (self.delta._version, self.log_alpha._version)
        if self._mask_cache is None or self._mask_cache[0] != key:
            with torch.no_grad():
                effective = (gate * self.delta).abs().flatten()
                keep = math.floor((1.0 - self.target_sparsity) * effective.numel())
                mask = effective != 0
                if int(mask.sum()) > keep:
                    mask = torch.zeros_like(mask)
                    mask[effective.topk(keep).indices] = True
                self._mask_cache = (key, mask.view(gate.shape).to(gate.dtype))
        return self._mask_cache[1]

    def expected_open(self) -> torch.Tensor:
        """P(z != 0) per entry: the expected L0 norm's terms."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.low / self.high))

    @torch.no_grad()
    def budget_mask(self, open_probability: torch.Tensor) -> torch.Tensor:
        """bool, W's shape: the entries within this parameter's budget, the floor((1 - target) * numel)
        largest P(open) * |δ| among those whose δ has moved off zero (none before the first step)."""
        score = (open_probability * self.delta.abs()).flatten()
        keep = min(math.floor((1.0 - self.target_sparsity) * score.numel()), int(score.count_nonzero()))
        mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        if keep:
            mask[score.topk(keep).indices] = True
        return mask.view(self.delta.shape)

    def effective_delta(self) -> torch.Tensor:
        gate = self.sampled_gate() if self.training else self.deterministic_gate()
        return gate * self.delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.effective_delta().to(weight.dtype)


def _targets(model: nn.Module, config: DiffPruningConfig, heads: list[tuple[str, nn.Module]] = ()
             ) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """(module name, module, parameter name, parameter) for every parameter `config` targets; none
    inside the modules trained whole (`heads`, from find_heads), as PEFT leaves them out."""
    patterns = resolve_target_modules(model, config)
    whole = [h for h, _ in heads]
    found = []
    for name, module in own_modules(model):
        if not name or not name_matches(name, patterns) or parametrize.is_parametrized(module):
            continue
        if any(name == h or name.startswith(h + ".") for h in whole):
            continue
        if isinstance(module, Linear4bit):
            raise ValueError(f"DiffPruningConfig.target_modules: {name!r} holds 4-bit NF4 weights, which cannot take "
                             "a learned delta (DiffPruning needs full-precision weights)")
        params = list(module.named_parameters(recurse=False))
        if not params:
            raise ValueError(f"DiffPruningConfig.target_modules: {name!r} ({type(module).__name__}) holds no "
                             "parameters of its own; name the layers inside it")
        found += [(name, module, pname, p) for pname, p in params]
    if not found:
        names = [n for n, m in own_modules(model) if n and list(m.parameters(recurse=False))][:6]
        raise ValueError(f"DiffPruningConfig.target_modules {config.target_modules!r} matched no module of "
                         f"{type(model).__name__} (modules with parameters are named like {names})")
    return found


def deltas_of(model: nn.Module) -> dict[str, HardConcreteDelta]:
    """'<module>.<param>' -> its delta parametrization, for every diff-pruned parameter."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, HardConcreteDelta):
                        found[f"{name}.{pname}" if name else pname] = p
    return found


def _require_deltas(model: nn.Module) -> dict[str, HardConcreteDelta]:
    deltas = deltas_of(model)
    if not deltas:
        raise ValueError("the model has no diff-pruning deltas (apply a DiffPruningConfig with "
                         "fastpeft.get_peft_model)")
    return deltas


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """The regulariser a training loop adds to its loss: ``l0_lambda * max(0, E[open gates] - budget)``,
    a float32 scalar, where the budget is ``(1 - target_sparsity)`` of all delta entries. Its gradient
    pushes the gates toward closed while more are open than the target allows, all but those of each
    parameter's budget of entries with the largest P(open) * |δ| (budget_mask), which the task alone
    moves.

    Why the budget is exempt: the deltas start at zero, so at first no gate has a task gradient, and
    the penalty's gradient is the same for every gate; Adam normalises it, so at the gates' rate
    (0.1) all of them marched down together to where each is open with P = 1 - target, which for a
    99 % target is log α ≈ -6, far below -2.4 where the deterministic gate is 0: the penalty was met
    by every gate being equally almost closed, and then neither gate nor delta got a gradient.
    Measured (AdamW, default config; CPU): the tiny random BERT of tests/test_compare.py, 150 steps
    of 16 at lr 1e-3, closed 100 % of the gates (exported delta all zero) and now 99.05 %; the tiny
    BERT classifier of tests/test_diff_pruning.py at target 0.95 (200 steps of 32, lr 3e-3) exported
    99.67 % zeros and a held-out loss of 0.882, now 95.37 % and 0.837 (untrained 1.098); at target
    0.99 and lr 1e-3 it closed every gate (loss 1.087, as with the head alone), now 99.06 % and 1.079.
    The penalty's value is unchanged; only where its gradient goes."""
    deltas = _require_deltas(model)
    config = next(iter(model.fastpeft_config.values()))
    entries = sum(d.delta.numel() for d in deltas.values())
    open_fraction = sum(_penalised_open(d).sum() for d in deltas.values()) / entries
    return config.l0_lambda * torch.relu(open_fraction - (1.0 - config.target_sparsity))


def _penalised_open(d: HardConcreteDelta) -> torch.Tensor:
    """P(open) per entry, counted in full but with no gradient inside the entry's budget (budget_mask)."""
    p = d.expected_open()
    return torch.where(d.budget_mask(p), p.detach(), p)


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer parameter groups: the deltas (and anything else trainable) at `lr`, the gates at
    the config's ``gate_lr`` without weight decay."""
    deltas = _require_deltas(model)
    config = next(iter(model.fastpeft_config.values()))
    gates = {id(d.log_alpha) for d in deltas.values()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gates]
    return [dict(params=rest, lr=lr),
            dict(params=[d.log_alpha for d in deltas.values()], lr=config.gate_lr or lr, weight_decay=0.0)]


@dataclass
class SparseDelta:
    """The trained model's deltas as applied in eval: '<module>.<param>' -> float32 tensor of the
    parameter's shape (mostly zeros); the model computes with W0 + delta."""

    deltas: dict[str, torch.Tensor]
    nonzero: int
    total: int

    @property
    def sparsity(self) -> float:
        """Fraction of delta entries that are zero."""
        return 1.0 - self.nonzero / self.total


@torch.no_grad()
def export_sparse_delta(model: nn.Module) -> SparseDelta:
    """The final sparse deltas (deterministic gates, projected to the target), whatever the mode."""
    out = {name: (d.deterministic_gate() * d.delta).detach().clone() for name, d in _require_deltas(model).items()}
    nonzero = sum(int(t.count_nonzero()) for t in out.values())
    return SparseDelta(out, nonzero, sum(t.numel() for t in out.values()))


@torch.no_grad()
def gate_sparsity(model: nn.Module) -> float:
    """Fraction of deterministic gates that are closed, before the projection: how far the L0
    penalty alone has taken the model toward its target."""
    gates = [d.deterministic_gate(project=False) for d in _require_deltas(model).values()]
    return 1.0 - sum(int(g.count_nonzero()) for g in gates) / sum(g.numel() for g in gates)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the exported sparse deltas into the weights and remove the parametrizations (in place)."""
    sparse = export_sparse_delta(model)
    for name in sparse.deltas:
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        original = module.parametrizations[pname].original
        parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
        with torch.no_grad():
            original.add_(sparse.deltas[name].to(original.dtype))
    for name, module in list(own_modules(model)):  # the modules trained whole keep their trained copy
        if isinstance(module, ModulesToSaveWrapper):
            replace_module(model, name, module.active_module)
    return forget_adapters(model)


@register
class DiffPruning(Method):
    config_cls = DiffPruningConfig

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)

    def apply(self, model: nn.Module, config: DiffPruningConfig, adapter_name: str) -> nn.Module:
        heads = find_heads(model, config)  # every lookup before any change
        targets = _targets(model, config, heads)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, module, pname, param in targets:
            parametrize.register_parametrization(module, pname, HardConcreteDelta(param, config))
            module.parametrizations.train(module.training)  # gates sampled only if the model trains
        wrap_heads(model, config, heads, adapter_name)
        return model

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        state = {}
        for name, d in deltas_of(model).items():
            state[f"{name}.delta"] = d.delta
            state[f"{name}.log_alpha"] = d.log_alpha
        return {**state, **heads_state_dict(model, adapter_name, "")}

    def expected_shapes(self, model: nn.Module, config: DiffPruningConfig) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, _, pname, param in _targets(model, config, find_heads(model, config)):
            shapes[f"{name}.{pname}.delta"] = shapes[f"{name}.{pname}.log_alpha"] = tuple(param.shape)
        return {**shapes, **heads_shapes(model, config, "")}
