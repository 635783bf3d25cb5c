"""What ``fastpeft bench`` makes of its rows: a table per op, the JSON results file, the chart."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys

import torch

from .. import __version__, backends
from .case import AT_MOST, BenchOp

# Environment variables that cap the instruction set of fastpeft's kernels, torch's, oneDNN's, MKL's
ISA_CAPS = ("FASTPEFT_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment(device: str) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
               fastpeft=__version__, torch=torch.__version__, triton=version("triton"), peft=version("peft"),
               bitsandbytes=version("bitsandbytes"), python=platform.python_version(), cpu=backends.cpu_model(),
               cpu_threads=torch.get_num_threads())
    if device == "cpu":  # the ISA each library runs at, and the caps set (a run emulating an older CPU says so)
        env.update(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   isa_caps={name: os.environ[name] for name in ISA_CAPS if name in os.environ})
        bnb = sys.modules.get("bitsandbytes.functional")
        if bnb is not None:  # loaded by the run: does it take its AVX512_BF16 CPU kernel
            env["bitsandbytes_avx512bf16"] = bool(bnb.has_avx512bf16())
    ext = backends.extension()
    if ext is not None:  # what the CPU kernels found and use: every CPU figure names its CPU
        env.update(cpu_isa_supported=ext.cpu_isa_supported(),
                   cpu_features=sorted(k for k, v in ext.cpu_features().items() if v))
        try:
            env["cpu_isa"] = ext.cpu_isa()
        except RuntimeError as e:  # an unknown FASTPEFT_CPU_ISA: the NF4 rows failed loudly already
            env["cpu_isa"] = str(e)
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    return env


def write_json(rows: list[dict], env: dict, path: str, partial: bool = False) -> None:
    """The results file: {"environment": env, "results": rows}, and "partial": true when `partial`
    (the rows of the cases finished so far, written while the run goes on: a run stopped by a
    timeout leaves them). Written whole to a side file, then renamed over `path`, so `path` is never
    left half written."""
    data = dict(environment=env, results=rows)
    if partial:
        data["partial"] = True
    side = f"{path}.tmp"
    with open(side, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(side, path)


def _ordered(rows: list[dict], key: str) -> list[str]:
    """The keys of every row's `key` dict, in first-seen order."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row[key] if n not in names]
    return names


def _aligned(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _mode(row: dict) -> str:
    return row["mode"] + (f" ({row['modules']})" if "modules" in row else "")


def target_line(target: dict) -> str:
    """One target record in words (results written before targets said where they came from lack
    direction, compares and source: all of theirs were upper limits)."""
    sign = "<=" if target.get("direction", AT_MOST) == AT_MOST else ">="
    verdict = "not measured" if target["value"] is None else f"{target['value']:.3f} {'met' if target['met'] else 'NOT met'}"
    about = "; ".join(target[k] for k in ("compares", "source") if target.get(k))
    return f"{target['ratio']} {sign} {target['limit']:.3g}: {verdict}" + (f" ({about})" if about else "")


def format_tables(rows: list[dict]) -> str:
    """One table per op, with that op's variants and ratios only, then the targets its rows checked."""
    out = []
    for op in dict.fromkeys(row["op"] for row in rows):
        mine = [row for row in rows if row["op"] == op]
        names, ratio_keys = _ordered(mine, "times_ms"), _ordered(mine, "ratios")
        lines = [["case", "shape", "dtype", "mode", "face"] + [f"{n} ms" for n in names] + ratio_keys]
        for row in mine:
            t, q = row["times_ms"], row["ratios"]
            lines.append([row["label"], row["shape"], row["dtype"], _mode(row), row["auto_face"]]
                         + [f"{t[n]:.3f}" if n in t else "-" for n in names]
                         + [f"{q[k]:.3f}" if k in q else "-" for k in ratio_keys])
        out += [op] + _aligned(lines)
        out += [f"  target, {row['label']} {row['mode']} {row['shape']}: {target_line(tgt)}" for row in mine for tgt in row["targets"]]
        out += [f"  refused, {row['label']} {row['mode']} {row['shape']}: {name}: {why}"
                for row in mine for name, why in row.get("refused", {}).items()]
        out.append("")
    return "\n".join(out).rstrip()


# ------------------------------------------------------------------------------------ the chart

BASELINE_GREY = "#8c8c8c"
FASTPEFT_BLUE = "#1f5fbf"
# Rivals each get their own colour, none of them blue (fastpeft's) or grey (the baseline's).
RIVAL_COLOURS = {"reference": "#b07aa1", "peft": "#e15759", "bitsandbytes": "#f28e2b", "separately": "#59a14f"}
FACE_BLUES = ["#6b9be0", "#9fc0ef", "#c9dbf6"]


def _colour(name: str, baseline: str, faces: list[str]) -> str:
    if name == baseline:
        return BASELINE_GREY
    if name == "fastpeft":
        return FASTPEFT_BLUE
    if name in faces:
        return FACE_BLUES[faces.index(name) % len(FACE_BLUES)]
    return RIVAL_COLOURS.get(name, "#9c755f")


def _case_name(row: dict) -> str:
    return f"{row['label']} {row['mode']} {row['dtype']}\n{row['shape']}"


def plot(rows: list[dict], ops: dict[str, BenchOp], path: str, title: str = "fastpeft bench") -> None:
    """One PNG: on top, every case's times over its base op's (log axis, 1 = the base op), fastpeft
    beside each rival; below, a panel per op with every variant's time per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_rows = {op: [row for row in rows if row["op"] == op] for op in dict.fromkeys(row["op"] for row in rows)}
    columns = min(2, len(op_rows))
    grid_rows = [list(op_rows)[i:i + columns] for i in range(0, len(op_rows), columns)]
    ratio_height = 1.4 + 0.42 * len(rows)
    panel_heights = [1.4 + max(len(op_rows[op]) * _case_height(op_rows[op]) for op in line) for line in grid_rows]
    fig = plt.figure(figsize=(8.5 * columns, ratio_height + sum(panel_heights)), layout="constrained")
    grid = fig.add_gridspec(1 + len(grid_rows), columns, height_ratios=[ratio_height] + panel_heights)
    _ratio_chart(fig.add_subplot(grid[0, :]), rows, ops)
    for i, line in enumerate(grid_rows):
        for j, op in enumerate(line):
            _op_panel(fig.add_subplot(grid[1 + i, j]), op_rows[op], ops[op], max(len(op_rows[o]) for o in line))
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _case_height(rows: list[dict]) -> float:
    """Inches per case in an op's panel: a bar per variant and a gap."""
    return 0.16 * len(_ordered(rows, "times_ms")) + 0.35


def _plain(suffix: str = "", only: tuple[int, ...] | None = None):
    """Log-axis tick labels as plain numbers (0.5, 2, 100), minor ticks labelled at `only` digits."""
    from matplotlib.ticker import FuncFormatter

    def label(value, _):
        if value <= 0 or only is not None and round(value / 10 ** math.floor(math.log10(value) + 1e-9)) not in only:
            return ""
        return f"{value:g}{suffix}"
    return FuncFormatter(label)


def _ratio_chart(ax, rows: list[dict], ops: dict[str, BenchOp]) -> None:
    """A row per case: fastpeft's time and each rival's over the base op's, log axis."""
    labels = [f"{row['op']}  {row['label']} {_mode(row)} {row['dtype']}  ({row['shape']})" for row in rows]
    ys = list(range(len(rows)))[::-1]
    ax.axvline(1.0, color=BASELINE_GREY, linewidth=2, zorder=1)
    seen = set()
    for y, row in zip(ys, rows):
        bench_op = ops[row["op"]]
        base = row["times_ms"][bench_op.baseline]
        rivals = [n for n in bench_op.peers + ((bench_op.reference,) if bench_op.reference else ())
                  if n in row["times_ms"]]
        # fastpeft on the case's line, each rival just below it, so that equal times stay visible
        for k, name in enumerate(["fastpeft"] + rivals):
            ratio = row["times_ms"][name] / base
            ours = name == "fastpeft"
            ax.scatter(ratio, y - 0.16 * k, s=110 if ours else 55, marker="o" if ours else "D", zorder=3 if ours else 2,
                       color=_colour(name, bench_op.baseline, []), edgecolor="black" if ours else "none",
                       label=name if name not in seen else None)
            seen.add(name)
            if ours:
                ax.annotate(f"{ratio:.2f}×", (ratio, y), xytext=(0, 7), textcoords="offset points", ha="center",
                            fontsize=8, color=FASTPEFT_BLUE)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_plain("×"))
    ax.xaxis.set_minor_formatter(_plain("×", only=(2, 5)))
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set_ylim(-0.8, len(rows) - 0.4)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.5), max(hi, 2.0))
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.set_xlabel("time / the base op's time  (log; grey line: the base op; left is faster)")
    ax.set_title("every case against its base op (base GEMM, nn.Linear, or copying x)", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, title="variant", frameon=False)


def _op_panel(ax, rows: list[dict], bench_op: BenchOp, slots: int) -> None:
    """Grouped bars: a group per case, a bar per variant (ms per call, or per layer; log axis).
    `slots`: cases the tallest panel beside it holds, so bars are as thick in each."""
    names = _ordered(rows, "times_ms")
    faces = [n for n in names if n.startswith("fastpeft[")]
    height = 0.8 / len(names)
    ys = [slots - 1 - i for i in range(len(rows))]  # the first case on top, as in the table
    for i, name in enumerate(names):
        at = [y - (i - (len(names) - 1) / 2) * height for y, row in zip(ys, rows) if name in row["times_ms"]]
        ms = [row["times_ms"][name] for row in rows if name in row["times_ms"]]
        ax.barh(at, ms, height, label=name, color=_colour(name, bench_op.baseline, faces),
                hatch="//" if name == bench_op.baseline else None, edgecolor="white", linewidth=0.5)
    ax.set_xscale("log")
    every = [ms for row in rows for ms in row["times_ms"].values()]
    ax.set_xlim(min(every) / 3, max(every) * 3)  # bars start well left of the fastest variant
    ax.xaxis.set_major_formatter(_plain())
    ax.xaxis.set_minor_formatter(_plain(only=(2, 5)))
    ax.set_yticks(ys, [_case_name(row) for row in rows], fontsize=8)
    ax.set_ylim(slots - len(rows) - 0.6, slots - 0.4)
    ax.set_xlabel("ms, median" + (" per layer" if any(row.get("layers", 1) > 1 for row in rows) else "")
                  + " (log)")
    ax.set_title(bench_op.name, fontsize=11)
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
