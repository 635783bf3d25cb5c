"""The ``fastpeft`` command: ``fastpeft info`` and ``fastpeft bench``."""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from . import __version__, backends


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
    forced = backends.forced_backend()
    print(f"backend: {'forced to ' + forced if forced else 'automatic'} (FASTPEFT_BACKEND / fastpeft.use_backend)")
    print("\nbackends:")
    for name in backends.BACKENDS:
        a = backends.availability(name)
        print(f"  {name:<7} {'usable' if a.usable else 'unusable':<9} {a.reason}")
    print("\nops (faces; * = chosen automatically for a 4096-token input on that device):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, op in all_ops().items():
        for dev in devices:
            faces = ", ".join(f + ("" if op.has_face(f, dev) or f in ("torch", "triton") else " (not built)")
                              for f in op.faces(dev))
            print(f"  {name:<18} {dev:<5} {faces}")
    return 0


def bench(args) -> int:
    from tqdm import tqdm

    from . import bench as fb

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tqdm(total=fb.count_steps(device, args.quick), desc="fastpeft bench", unit="variant",
              disable=args.no_progress, file=sys.stderr) as progress:
        rows = fb.run_lora(device, args.quick, progress)
    env = fb.environment(device)
    print(fb.format_table(rows))
    path = args.json or f"bench-{datetime.date.today().isoformat()}-{device}.json"
    fb.write_json(rows, env, path)
    print(f"\nwrote {path}")
    if args.plot:
        fb.plot(rows, args.plot)
        print(f"wrote {args.plot}")
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
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return info() if args.command == "info" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
