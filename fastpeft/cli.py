"""The ``fastpeft`` command: ``fastpeft info``, ``bench``, ``finetune`` and ``compare``."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from . import __version__, backends
from . import bench as fb  # its op list names --op's choices
from .compare import COMPARE_METHODS
from .finetune import METHODS, PEFT_METHODS


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def info() -> int:
    from .ops import all_ops

    print(f"fastpeft {__version__}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"triton {_version('triton')}")
    print(f"peers: peft {_version('peft')}, transformers {_version('transformers')}, "
          f"bitsandbytes {_version('bitsandbytes')}")
    if torch.cuda.is_available():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{cap.replace('.', '')})")
    else:
        print("GPU: none visible to torch")
    ext = backends.extension()
    if ext is None:
        print(f"extension: not built: {backends.extension_error()}")
    else:
        cuda = f"with CUDA for {ext.cuda_archs()}" if ext.built_with_cuda() else "CPU only (no CUDA kernels)"
        print(f"extension: fastpeft._C built, {cuda}, OpenMP {'on' if ext.built_with_openmp() else 'off'}")
        _print_cpu(ext)
    forced = backends.forced_backend()
    print(f"backend: {'forced to ' + forced if forced else 'automatic'} (FASTPEFT_BACKEND / fastpeft.use_backend)")
    print("\nbackends:")
    for name in backends.BACKENDS:
        a = backends.availability(name)
        print(f"  {name:<7} {'usable' if a.usable else 'unusable':<9} {a.reason}")
    print("\nops and their faces per device:")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, op in all_ops().items():
        for dev in devices:
            faces = ", ".join(f + ("" if op.has_face(f, dev) or f in ("torch", "triton") else " (not built)")
                              for f in op.faces(dev))
            print(f"  {name:<18} {dev:<5} {faces}")
    return 0


# Shapes `fastpeft info` shows the NF4 CPU path of: decode (1, 4), the GEMV's last row count (16),
# prefill (64), with a 4096-wide layer in blocks of 64.
NF4_INFO_ROWS = (1, 4, 5, 16, 17, 64)
NF4_INFO_DTYPES = ("float32", "float16", "bfloat16")


def _print_cpu(ext) -> None:
    features = ext.cpu_features()
    have = " ".join(name for name, present in features.items() if present) or "none"
    lack = " ".join(name for name, present in features.items() if not present) or "none"
    print(f"CPU: {backends.cpu_model()}, {torch.get_num_threads()} threads; has {have}; lacks {lack}")
    cap = os.environ.get("FASTPEFT_CPU_ISA")
    try:
        isa = ext.cpu_isa()
    except RuntimeError as e:  # a FASTPEFT_CPU_ISA the kernels refuse: say so, and what it would be
        print(f"CPU kernels: {e}; unset, they run at {ext.cpu_isa_supported()}")
        return
    print(f"CPU kernels: {isa} (the CPU supports {ext.cpu_isa_supported()}"
          + (f"; FASTPEFT_CPU_ISA={cap} caps it)" if cap else "; FASTPEFT_CPU_ISA caps it)"))
    print("NF4 CPU paths (K = 4096, blocksize 64):")
    print("  " + f"{'rows':<12}" + "".join(f"{d:<20}" for d in NF4_INFO_DTYPES))
    rows = [(f"M = {m}", m, False) for m in NF4_INFO_ROWS] + [("backward", 64, True)]
    for label, m, transposed in rows:
        paths = (ext.nf4_cpu_path(m, 4096, 64, d, transposed) for d in NF4_INFO_DTYPES)
        print(f"  {label:<12}" + "".join(f"{p:<20}" for p in paths))
    print("  (K % 32 != 0, blocksize < 32 or float64: gemv-portable, tiles-portable)")


def bench(args) -> int:
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tqdm(total=fb.count_cases(device, args.quick, args.op), desc="fastpeft bench", unit="case",
              disable=args.no_progress, file=sys.stderr) as progress:
        rows = fb.run_suites(device, args.quick, args.op, progress)
    env = fb.environment(device)
    print(fb.format_table(rows))
    path = args.json or f"bench-{datetime.date.today().isoformat()}-{device}.json"
    fb.write_json(rows, env, path)
    print(f"\nwrote {path}")
    if args.plot:
        fb.plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def finetune(args) -> int:
    from .finetune import FinetuneSettings, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    settings = FinetuneSettings(method=args.method, model=args.model, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                seed=args.seed, dtype=args.dtype, device=device, log_every=args.log_every,
                                save=args.save, progress=not args.no_progress,
                                num_virtual_tokens=args.num_virtual_tokens, trainable_layers=args.trainable_layers,
                                target_sparsity=args.target_sparsity)
    if args.compare and args.method not in PEFT_METHODS:
        print(f"fastpeft finetune: --compare peft trains {', '.join(PEFT_METHODS)} only, not {args.method}",
              file=sys.stderr)
        return 2
    run(settings, compare=args.compare, json_path=args.json)
    return 0


def compare(args) -> int:
    from .compare import CompareSettings, run

    settings = CompareSettings(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               eval_size=args.eval_size, few_shot=args.few_shot, seed=args.seed,
                               device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                               threads=args.threads, progress=not args.no_progress)
    if args.methods:
        settings.methods = args.methods.split(",")
    run(settings, json_path=args.json, plot_path=args.plot)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastpeft", description="fused kernels for parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends are built and usable here")
    b = sub.add_parser("bench", help="kernel microbenchmarks beside the reference and PEFT")
    b.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: a smoke run (CI)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if a GPU is visible, else cpu")
    b.add_argument("--json", metavar="FILE", help="where to write results (default bench-<date>-<device>.json)")
    b.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart")
    b.add_argument("--op", action="append", choices=list(fb.SUITES), metavar="OP",
                   help=f"only this op's cases (repeatable; default all: {', '.join(fb.SUITES)})")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = sub.add_parser("finetune", help="fine-tune a causal LM with a PEFT method; loss, tokens/s, peak memory")
    f.add_argument("--method", choices=METHODS, default="lora")
    f.add_argument("--model", metavar="DIR", help="local Hugging Face model directory (default: a tiny random Llama)")
    f.add_argument("--compare", choices=["peft"], help="also train with the peft package, same data and seed")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, help="default: the method's usual rate (lora 5e-3; see finetune.DEFAULT_LR)")
    f.add_argument("--r", type=int, default=16)
    f.add_argument("--lora-alpha", type=float, default=32)
    f.add_argument("--target-modules", default="all-linear", help='"all-linear" or comma-separated names')
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    f.add_argument("--device", choices=["cpu", "cuda"])
    f.add_argument("--log-every", type=int, default=50, metavar="N", help="print a line every N steps")
    f.add_argument("--num-virtual-tokens", type=int, default=8, help="prompt and prefix tuning")
    f.add_argument("--trainable-layers", type=int, default=1, metavar="K", help="layerfreeze: the top K layers train")
    f.add_argument("--target-sparsity", type=float, default=0.99, help="diffpruning: fraction of the delta left zero")
    f.add_argument("--save", metavar="DIR", help="write the trained adapter here (PEFT's format if PEFT has it)")
    f.add_argument("--json", metavar="FILE", help="write per-step losses and the summary")
    f.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", help="every PEFT method and in-context learning on one task: params, checkpoint, "
                                       "memory, step time, accuracy")
    c.add_argument("--methods", metavar="M1,M2", help=f"a subset of {','.join(COMPARE_METHODS)} (default: all)")
    c.add_argument("--model", metavar="DIR", help="local Hugging Face model and tokenizer (default: tiny random Llama)")
    c.add_argument("--steps", type=int, default=150, help="training steps per method (the same batches for each)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, help="one rate for every method (default: each method's usual rate)")
    c.add_argument("--eval-size", type=int, default=256, help="held-out examples scored")
    c.add_argument("--few-shot", type=int, default=3, help="demonstrations in the in-context-learning prompts")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", choices=["cpu", "cuda"])
    c.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    c.add_argument("--json", metavar="FILE", help="write the table as JSON")
    c.add_argument("--plot", metavar="FILE.png", help="draw memory and accuracy per method")
    c.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    commands = {"info": info, "bench": bench, "finetune": finetune, "compare": compare}
    return commands[args.command](*(() if args.command == "info" else (args,)))


if __name__ == "__main__":
    sys.exit(main())
