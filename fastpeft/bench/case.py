"""What a benchmark is made of: a :class:`Case` (one shape, dtype and mode of one op), the
:class:`Target` it is held to, and the :class:`BenchOp` that says how to time an op's cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

AT_MOST, AT_LEAST = "at most", "at least"


@dataclass(frozen=True)
class Target:
    """A speed goal from the project's issues: ``ratio`` must be `direction` `limit`.

    Checked and reported by ``fastpeft bench``, never asserted: a noisy machine can miss a target
    that holds."""

    ratio: str       # "a/b": time of variant a over time of variant b, or a ratio the op derives
    direction: str   # AT_MOST or AT_LEAST
    limit: float
    compares: str    # what is compared, in words
    source: str      # where the target was set

    def __post_init__(self):
        if self.direction not in (AT_MOST, AT_LEAST):
            raise ValueError(f"Target.direction must be {AT_MOST!r} or {AT_LEAST!r}, not {self.direction!r}")

    def met_by(self, value: float) -> bool:
        return value <= self.limit if self.direction == AT_MOST else value >= self.limit

    def record(self, value: float | None) -> dict:
        """The JSON record of this target against a measured value (None: not measured here)."""
        return dict(ratio=self.ratio, direction=self.direction, limit=self.limit, value=value,
                    met=None if value is None else self.met_by(value), compares=self.compares, source=self.source)


@dataclass
class Case:
    """One timed setting of an op: every variant of the op runs it, interleaved, in the same run."""

    label: str       # what the case stands for: "decode", "prefill", "training", "quick"...
    mode: str        # "fwd": inference under no_grad; "fwd+bwd": one training step of the layer
    dtype: str       # "fp32", "fp16" or "bf16"
    dims: dict       # the op's sizes in its own letters (M, K, N, r...); each becomes a field of the row
    targets: tuple[Target, ...] = ()
    # Distinct weights one call runs back to back, as a model's decode step does, so that they
    # stream from memory instead of sitting in the last-level cache; times are reported per layer.
    layers: int = 1
    # "eval" or "train": the mode every module runs in, stated where a peer's speed depends on it
    # (bitsandbytes takes its fast CPU kernel in eval mode only).
    modules: str = ""

    @property
    def shape(self) -> str:
        # None marks a dimension that is not factored (PHM's full Bᵢ has no rank)
        sizes = " ".join(f"{name}={'full' if size is None else size}" for name, size in self.dims.items())
        return sizes + (f" x{self.layers} layers" if self.layers > 1 else "")

    @property
    def training(self) -> bool:
        return self.mode == "fwd+bwd"

    def __str__(self) -> str:
        return f"{self.label} {self.mode} {self.shape} {self.dtype}"


Variants = dict[str, Callable[[], None]]


@dataclass(frozen=True)
class BenchOp:
    """How to benchmark one op: its cases for a device, and the variants that time one case.

    Every variant runs one iteration of the case. ``fastpeft`` is the library's automatic choice;
    ``fastpeft[<face>]`` the same with one face forced; the others are named by role, so the report
    knows what to compare: the `baseline` is the work without any adapter (every ratio's yardstick),
    `reference` fastpeft's own pure-PyTorch face, `peers` other ways to do the same work."""

    name: str
    cases: Callable[[str, bool], list[Case]]    # (device, quick) -> cases
    variants: Callable[[Case, str], Variants]   # (case, device) -> {variant name: one call}
    baseline: str
    peers: tuple[str, ...] = ()
    reference: str | None = "reference"
    # Ratios the op computes itself from its rows (time differences, ratios across cases), filled
    # in before the targets are checked.
    derive_ratios: Callable[[list[dict]], None] | None = None
    # More about the face that ran, for the report (NF4: the CPU kernel's path for the shape).
    face_detail: Callable[[Case, str], str] | None = None
    # (warm-up calls, timed rounds) of a full run when the runner's default does not fit: a whole
    # model's generation takes seconds a call, so the default's 17 calls of each variant would not.
    repetitions: tuple[int, int] | None = None

    @property
    def rivals(self) -> tuple[str, ...]:
        """What fastpeft's time is divided by, the baseline first."""
        return (self.baseline,) + self.peers + ((self.reference,) if self.reference else ())

    @property
    def variant_names(self) -> tuple[str, ...]:
        """Every variant by role, without the forced faces (those depend on the machine)."""
        return (self.baseline, "fastpeft") + self.peers + ((self.reference,) if self.reference else ())

