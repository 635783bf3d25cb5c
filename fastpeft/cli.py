"""The ``fastpeft`` command: ``fastpeft info``, ``bench``, ``finetune`` and ``compare``."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from . import __version__, backends, models
from .models import MODELS
from . import bench as fb  # its op list names --op's choices
from .compare import COMPARE_METHODS, CompareSettings
from .finetune import METHODS, PEFT_METHODS, FinetuneSettings


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
            faces = ", ".join(f if op.has_face(f, dev) else f"{f} (missing: {op.missing_face(f, dev)})"
                              for f in op.faces(dev))
            print(f"  {name:<18} {dev:<5} {faces}")
    return 0


# Shapes `fastpeft info` shows the NF4 CPU path of: decode (1, 4), the GEMV's last row count (16),
# prefill (64), with a 4096-wide layer in blocks of 64.
NF4_INFO_ROWS = (1, 4, 5, 16, 17, 64)
INFO_DTYPES = ("float32", "float16", "bfloat16")
# ...and the dense_linear CPU path of: decode, and each side of the GEMV's row limits (3, 4).
DENSE_INFO_ROWS = (1, 2, 3, 4, 5)


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
    print("  " + f"{'rows':<12}" + "".join(f"{d:<20}" for d in INFO_DTYPES))
    rows = [(f"M = {m}", m, False) for m in NF4_INFO_ROWS] + [("backward", 64, True)]
    for label, m, transposed in rows:
        paths = (ext.nf4_cpu_path(m, 4096, 64, d, transposed) for d in INFO_DTYPES)
        print(f"  {label:<12}" + "".join(f"{p:<20}" for p in paths))
    print("  (K % 32 != 0, blocksize < 32 or float64: gemv-portable, tiles-portable)")
    print("dense_linear CPU paths (a full-precision layer: DenseLinear, a 4-bit model's output layer):")
    print("  " + f"{'rows':<12}" + "".join(f"{d:<20}" for d in INFO_DTYPES))
    for m in DENSE_INFO_ROWS:
        print(f"  {f'M = {m}':<12}" + "".join(f"{ext.dense_cpu_path(m, d):<20}" for d in INFO_DTYPES))


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def bench(args) -> int:
    from tqdm import tqdm

    if args.static:
        from .bench import static
        return static.run((90, 80), args.op, args.check, args.json)
    if args.check:
        raise SystemExit("fastpeft bench: --check goes with --static")
    device = _device(args)
    ops = fb.selected(args.op, args.quick)
    try:
        fb.check_labels(ops, device, args.quick, args.case)
    except ValueError as e:
        raise SystemExit(f"fastpeft bench: --case: {e}") from None
    path = args.json or f"bench-{datetime.date.today().isoformat()}-{device}.json"
    # the file holds every finished case's row as the run goes (marked partial), so a run stopped
    # part way (the device check's per-op timeout) still leaves what it measured
    finished, env = [], fb.environment(device)

    def keep(row):
        finished.append(row)
        fb.write_json(finished, env, path, partial=True)

    with tqdm(total=fb.count_cases(device, args.quick, args.op, args.case), desc="fastpeft bench", unit="case",
              disable=args.no_progress, file=sys.stderr) as progress:
        rows = fb.run(ops, device, args.quick, progress, args.case, on_case=keep)
    env = fb.environment(device)  # again: what the run loaded (bitsandbytes' CPU kernel) shows now
    print(fb.format_tables(rows))
    fb.write_json(rows, env, path)
    print(f"\nwrote {path}")
    if args.plot:
        machine = env.get("gpu") or env.get("cpu") or device
        fb.plot(rows, fb.ALL_OPS, args.plot, f"fastpeft bench{' --quick' if args.quick else ''}: {machine}, "
                                          f"{env['date'][:10]}")
        print(f"wrote {args.plot}")
    return 0


def finetune(args) -> int:
    from .finetune import run

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    settings = FinetuneSettings(method=args.method, model=models.resolve(args.model), steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                seed=args.seed, dtype=args.dtype, device=_device(args), log_every=args.log_every,
                                save=args.save, progress=not args.no_progress,
                                num_virtual_tokens=args.num_virtual_tokens, trainable_layers=args.trainable_layers,
                                target_sparsity=args.target_sparsity)
    run(settings, compare=args.compare, json_path=args.json)
    return 0


def compare(args) -> int:
    from .compare import CompareSettings, run

    settings = CompareSettings(model=models.resolve(args.model), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               eval_size=args.eval_size, few_shot=args.few_shot, max_length=args.max_length,
                               seed=args.seed,
                               device=_device(args), threads=args.threads, progress=not args.no_progress)
    if args.methods:
        settings.methods = args.methods
    name = args.model if args.model is None or args.model in MODELS else os.path.basename(os.path.normpath(args.model))
    threads = settings.threads or torch.get_num_threads()
    machine = (f"{backends.cpu_model()}, {threads} thread{'s' if threads != 1 else ''}"
               if settings.device == "cpu" else settings.device)
    title = f"fastpeft compare --model {name or '(tiny random Llama)'}: {settings.steps} steps x {settings.batch_size}, {machine}"
    run(settings, json_path=args.json, plot_path=args.plot, title=title)
    return 0


# ------------------------------------------------------------------------ argument types and checks
# Each raises argparse.ArgumentTypeError: argparse then prints the usage and a one-line error and
# exits with status 2, before any model is loaded or any kernel runs.

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def causal_model(text: str) -> str:
    """--model of the commands that train causal LMs: a pretrained model fastpeft knows by name (see
    fastpeft.models; its folder is found, or converted once, when the command runs) or a local
    Hugging Face model folder, checked here so that a typo is not taken for a Hub name."""
    if text in MODELS and MODELS[text].kind != "causal":
        raise argparse.ArgumentTypeError(f"{text} is an encoder ({MODELS[text].distribution}); this command "
                                         "trains causal LMs: use " + ", ".join(
                                             n for n, m in MODELS.items() if m.kind == "causal"))
    return any_model(text)


def any_model(text: str) -> str:
    """--model of compare (causal LMs and encoder classifiers, told apart by their config when it
    runs): a pretrained model fastpeft knows by name, or a local Hugging Face model folder."""
    if text in MODELS:
        return text
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: neither a model fastpeft knows ({', '.join(MODELS)}) nor a "
                                         "directory (a local Hugging Face model folder; nothing is downloaded)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text}: no config.json in it, so it is not a Hugging Face model folder")
    return text


def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {','.join(COMPARE_METHODS)}")
    return methods


def writable_file(text: str) -> str:
    """An output file whose folder exists: checked before a run that may take minutes."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


class DefaultsInHelp(argparse.HelpFormatter):
    """Every option's help ends with its default; an option without one (None) says in its own
    words what happens when it is not given."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``fastpeft`` parser and each command's own (whose errors name the command)."""
    top = argparse.ArgumentParser(prog="fastpeft", description="fused kernels for parameter-efficient fine-tuning")
    top.add_argument("--version", action="version", version=f"fastpeft {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    commands = {}

    def command(name: str, help: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=help, description=help, formatter_class=DefaultsInHelp)
        return commands[name]

    command("info", "versions, GPU, and which backends are built and usable here")
    b = command("bench", "kernel microbenchmarks beside the base op, the reference and the peers (PEFT, bitsandbytes)")
    b.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: a smoke run (CI)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default: cuda if a GPU is visible, else cpu)")
    b.add_argument("--json", metavar="FILE", type=writable_file,
                   help="where to write the results (default: bench-<date>-<device>.json here)")
    b.add_argument("--plot", metavar="FILE.png", type=writable_file,
                   help="also draw the ratios to each case's base op, and every op's times (default: no chart)")
    b.add_argument("--op", action="append", choices=list(fb.ALL_OPS), metavar="OP",
                   help=f"only this op's cases; repeatable; one of {', '.join(fb.ALL_OPS)} (default: every kernel op; "
                        f"{', '.join(fb.MODEL_OPS)}: end to end on SmolLM2-135M, generation and a QLoRA step beside "
                        "bitsandbytes, PEFT and bf16, run when named, and with --quick on a tiny random Llama)")
    b.add_argument("--case", action="append", metavar="LABEL",
                   help="only the cases with this label (as the tables print it: decode, prefill, "
                        "'4-bit generation'...); repeatable (default: every case of the chosen ops)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--static", action="store_true",
                   help="no kernel runs: compile each GPU case's Triton launches as the JIT does, for sm_90 and sm_80, "
                        "and print the static performance model (registers, spills, shared memory, occupancy, bytes "
                        "in flight, estimated time beside the roofline ideal); needs no GPU")
    b.add_argument("--check", action="store_true",
                   help="with --static: exit 1 on a spill, shared memory over a block's limit, or an NF4/LoRA GEMV "
                        "with under 20 KB in flight per SM (known failures named by their issue pass)")

    f = command("finetune", "fine-tune a causal LM with a PEFT method; loss, tokens/s, peak memory")
    f.add_argument("--method", choices=METHODS, default="lora", metavar="METHOD",
                   help=f"the PEFT method: {', '.join(METHODS)}")
    f.add_argument("--model", metavar="NAME|DIR", type=causal_model,
                   help="smollm2 (pretrained, see fastpeft.models) or a local Hugging Face model folder "
                        "(default: a tiny random Llama)")
    f.add_argument("--compare", choices=["peft"],
                   help=f"also train with the peft package, same data and seed ({', '.join(PEFT_METHODS)} only; default: fastpeft alone)")
    f.add_argument("--steps", type=positive_int, default=FinetuneSettings.steps, help="training steps")
    f.add_argument("--batch-size", type=positive_int, default=FinetuneSettings.batch_size, help="sequences per step")
    f.add_argument("--lr", type=positive_float, help="learning rate (default: the method's usual one; see "
                                                     "fastpeft.finetune.DEFAULT_LR)")
    f.add_argument("--r", type=positive_int, default=FinetuneSettings.r, help="LoRA / QLoRA rank")
    f.add_argument("--lora-alpha", type=positive_float, default=FinetuneSettings.lora_alpha,
                   help="LoRA / QLoRA alpha (scaling alpha / r)")
    f.add_argument("--target-modules", default="all-linear", help='"all-linear" or comma-separated module names')
    f.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and of the data")
    f.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the model's dtype")
    f.add_argument("--device", choices=["cpu", "cuda"], help="where to train (default: cuda if a GPU is visible, else cpu)")
    f.add_argument("--log-every", type=non_negative_int, default=50, metavar="N",
                   help="print a line every N steps (0: none)")
    f.add_argument("--num-virtual-tokens", type=positive_int, default=8, help="prompt and prefix tuning")
    f.add_argument("--trainable-layers", type=positive_int, default=1, metavar="K",
                   help="layerfreeze: the top K layers train")
    f.add_argument("--target-sparsity", type=fraction, default=0.99,
                   help="diffpruning: the fraction of the weight delta left zero")
    f.add_argument("--save", metavar="DIR", help="write the trained adapter here, in PEFT's format if PEFT has the method (default: not saved)")
    f.add_argument("--json", metavar="FILE", type=writable_file, help="write per-step losses and the summary (default: not written)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = command("compare", "every PEFT method and in-context learning on one task: params, checkpoint, memory, "
                           "step time, accuracy")
    c.add_argument("--methods", metavar="M1,M2", type=method_list,
                   help=f"a subset of {','.join(COMPARE_METHODS)} (default: all)")
    c.add_argument("--model", metavar="NAME|DIR", type=any_model,
                   help="minilm or smollm2 (pretrained, see fastpeft.models) or a local Hugging Face model folder "
                        "with its tokenizer: a causal LM completes reviews of a sentiment task with their label word, "
                        "an encoder (BERT-style, told by its config) learns the same task as a sequence classifier "
                        "(default: a tiny random Llama, on a 4-class rating task its word tokenizer can spell)")
    c.add_argument("--steps", type=positive_int, default=CompareSettings.steps,
                   help="training steps per method (the same batches for each)")
    c.add_argument("--batch-size", type=positive_int, default=CompareSettings.batch_size, help="examples per step")
    c.add_argument("--lr", type=positive_float, help="one rate for every method (default: each method's usual rate)")
    c.add_argument("--eval-size", type=positive_int, default=CompareSettings.eval_size, help="held-out examples scored")
    c.add_argument("--few-shot", type=non_negative_int, default=CompareSettings.few_shot,
                   help="demonstrations in the few-shot in-context-learning prompts (icl; icl0 has none)")
    c.add_argument("--max-length", type=positive_int, default=CompareSettings.max_length,
                   help="encoder: tokens per review at most")
    c.add_argument("--seed", type=int, default=CompareSettings.seed, help="seed of the model, data and training")
    c.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default: cuda if a GPU is visible, else cpu)")
    c.add_argument("--threads", type=positive_int, help="torch threads per run (default: torch's)")
    c.add_argument("--json", metavar="FILE", type=writable_file, help="write the table as JSON (default: not written)")
    c.add_argument("--plot", metavar="FILE.png", type=writable_file, help="draw memory and accuracy per method (default: no chart)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    return top, commands


def main(argv=None) -> int:
    top, commands = parsers()
    args = top.parse_args(argv)
    if args.command == "finetune" and args.compare and args.method not in PEFT_METHODS:
        commands["finetune"].error(f"--compare peft trains {', '.join(PEFT_METHODS)} only, not {args.method}")
    if args.command == "info":
        return info()
    return {"bench": bench, "finetune": finetune, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
