"""``fastpeft finetune``: fine-tune a causal LM with a PEFT method; report loss, speed and memory.

Every method of the family trains through the same loop (``--method``, see :data:`METHODS`); each
method's config comes from :func:`method_config`, with its usual learning rate unless ``lr`` is
given (:data:`DEFAULT_LR`), and DiffPruning's L0 penalty is added to the loss it optimises.

The default needs no download: a small Llama built from a transformers config with random weights,
trained on a synthetic task it can learn (copy a random 8-token pattern after a separator: the loss
is taken on the copy). ``--compare peft`` runs the same training (same data, same seed, same
settings) with the ``peft`` package, each library in a fresh process so peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

# qlora: NF4 base (double-quantised), LoRA on top; dora: LoRA with use_dora (a magnitude per output
# row); prompt/prefix: prompt and prefix tuning; bottleneck/compacter: adapters; layerfreeze: the
# top layers only; full: full fine-tuning.
METHODS = ("lora", "qlora", "dora", "prompt", "prefix", "ia3", "bottleneck", "compacter", "bitfit", "diffpruning",
           "layerfreeze", "full")
LORA_METHODS = ("lora", "qlora", "dora")  # a LoraConfig each
PEFT_METHODS = LORA_METHODS  # those --compare peft can also train with the peft package
# Each method's usual AdamW learning rate for small models: methods training few parameters far
# from the output (soft prompts, scaling vectors, biases) take larger steps; full fine-tuning smaller.
DEFAULT_LR = {"lora": 5e-3, "qlora": 5e-3, "dora": 5e-3, "prompt": 3e-2, "prefix": 1e-2, "ia3": 5e-2,
              "bottleneck": 5e-3, "compacter": 5e-3, "bitfit": 1e-2, "diffpruning": 5e-3, "layerfreeze": 1e-3,
              "full": 1e-3}
BOS, SEP, FIRST_TOKEN = 1, 2, 4


@dataclass
class FinetuneSettings:
    method: str = "lora"
    model: str | None = None  # local Hugging Face model directory; None: the tiny default Llama
    steps: int = 300
    batch_size: int = 32
    pattern_length: int = 8
    lr: float | None = None  # None: the method's DEFAULT_LR
    r: int = 16
    lora_alpha: float = 32
    target_modules: str | list = "all-linear"  # LoRA, QLoRA, DiffPruning
    num_virtual_tokens: int = 8  # prompt and prefix tuning
    trainable_layers: int = 1  # layer freezing: the top k layers train
    target_sparsity: float = 0.99  # DiffPruning
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    log_every: int = 50
    save: str | None = None
    progress: bool = True


@dataclass
class RunResult:
    library: str
    method: str
    steps: int
    tokens_per_step: int
    losses: list = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0  # mean time of a step, the first (one-off costs) left out

    def first_and_final_loss(self) -> tuple[float, float, int]:
        """(mean loss of the first n steps, of the last n steps, n): n is 10, or half the steps
        when there are fewer than 20, so the two windows never share a step."""
        n = max(1, min(10, len(self.losses) // 2))
        first, final = self.losses[:n], self.losses[-n:]
        return sum(first) / n, sum(final) / n, n


def default_model(seed: int, vocab_size: int = 64, bias: bool = False):
    """The tiny random Llama; `bias`: its linear layers get biases (attention_bias, mlp_bias), so
    that BitFit has something to train."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_bias=bias, mlp_bias=bias)
    return tf.LlamaForCausalLM(cfg)


def load_model(s: FinetuneSettings):
    if s.model is None:  # BitFit needs biases to train: then the tiny Llama is built with them
        return default_model(s.seed, bias=s.method == "bitfit")
    import transformers as tf

    torch.manual_seed(s.seed)
    return tf.AutoModelForCausalLM.from_pretrained(s.model, local_files_only=True)


def copy_task_batches(s: FinetuneSettings, vocab_size: int):
    """The same batches for every run: [BOS, p1..pk, SEP, p1..pk], loss on the copy only."""
    if vocab_size <= FIRST_TOKEN + 1:
        raise ValueError(f"the copy task needs a vocabulary larger than {FIRST_TOKEN + 1} tokens")
    g = torch.Generator().manual_seed(s.seed + 1)
    for _ in range(s.steps):
        pattern = torch.randint(FIRST_TOKEN, vocab_size, (s.batch_size, s.pattern_length), generator=g)
        ids = torch.cat([torch.full((s.batch_size, 1), BOS), pattern, torch.full((s.batch_size, 1), SEP), pattern], 1)
        labels = ids.clone()
        labels[:, : s.pattern_length + 2] = -100
        yield ids, labels


def _bnb_quantize(model, compute_dtype):
    """QLoRA's base as bitsandbytes makes it: every linear but the output layer in NF4, double-quantised."""
    import bitsandbytes as bnb

    from .targeting import output_layer_names
    from .targeting import replace_module

    skip = output_layer_names(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name not in skip:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
            replace_module(model, name, q.to(module.weight.device))
    return model


def method_config(s: FinetuneSettings):
    """The fastpeft config of `s.method` (its other settings at their defaults). The methods' config
    classes are imported here, one at a time, so that one that fails to import fails its own run only."""
    if s.method not in METHODS:
        raise ValueError(f"unknown method {s.method!r}; choose from {METHODS}")
    if s.method in LORA_METHODS:
        from .config import LoraConfig

        return LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=s.target_modules,
                          use_dora=s.method == "dora")
    if s.method == "prompt":
        from .methods.prompt_tuning import PromptTuningConfig

        return PromptTuningConfig(num_virtual_tokens=s.num_virtual_tokens)
    if s.method == "prefix":
        from .methods.prefix_tuning import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=s.num_virtual_tokens)
    if s.method == "ia3":
        from .methods.ia3 import IA3Config

        return IA3Config()
    if s.method == "bottleneck":
        from .methods.bottleneck import BottleneckConfig

        return BottleneckConfig()
    if s.method == "compacter":
        from .methods.compacter import CompacterConfig

        return CompacterConfig()
    if s.method == "bitfit":
        from .methods.bitfit import BitFitConfig

        return BitFitConfig()
    if s.method == "diffpruning":
        from .methods.diff_pruning import DiffPruningConfig

        return DiffPruningConfig(target_modules=s.target_modules, target_sparsity=s.target_sparsity)
    if s.method == "layerfreeze":
        from .methods.layer_freezing import LayerFreezingConfig

        return LayerFreezingConfig(num_trainable_layers=s.trainable_layers)
    from .methods.full_finetune import FullFinetuneConfig

    return FullFinetuneConfig()


def learning_rate(s: FinetuneSettings) -> float:
    return s.lr if s.lr is not None else DEFAULT_LR[s.method]


def apply_method(model, s: FinetuneSettings, library: str):
    config = method_config(s)
    if library == "fastpeft":
        import fastpeft

        if s.method == "qlora":
            fastpeft.quantize_model(model, double_quant=True)
        return fastpeft.get_peft_model(model, config)
    if s.method not in PEFT_METHODS:
        raise ValueError(f"--compare peft trains {', '.join(PEFT_METHODS)} only, not {s.method!r}")
    kwargs = dict(r=s.r, lora_alpha=s.lora_alpha, target_modules=s.target_modules, use_dora=s.method == "dora")
    import peft

    if s.method == "qlora":
        _bnb_quantize(model, next(model.parameters()).dtype)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def make_optimizer(model, s: FinetuneSettings) -> torch.optim.Optimizer:
    """AdamW over what trains; DiffPruning's gates get their own learning rate."""
    lr = learning_rate(s)
    if s.method == "diffpruning":
        from .methods import diff_pruning

        return torch.optim.AdamW(diff_pruning.param_groups(model, lr), lr=lr)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def regulariser(s: FinetuneSettings):
    """What the method adds to the task loss (a function of the model), or None."""
    if s.method == "diffpruning":
        from .methods.diff_pruning import l0_penalty

        return l0_penalty
    return None


def rss_mb() -> float:
    """The process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Starts the process's peak resident memory over from now, where Linux allows it (writing 5 to
    /proc/self/clear_refs): otherwise the peak is the process's whole life's, and a run after a
    larger one (a test suite, a second method) would report the earlier peak as its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """The process's peak resident memory since :func:`reset_peak_rss` (or its start), MiB: its
    VmHWM, which the reset starts over (getrusage's maxrss also keeps the peaks of exited threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(s: FinetuneSettings, library: str) -> RunResult:
    """One training run on the copy task in this process."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.dtype]
    model = load_model(s).to(device=s.device, dtype=dtype)
    model = apply_method(model, s, library)  # (qlora: quantised here, so the peak includes the 4-bit base)
    vocab = model.get_input_embeddings().num_embeddings
    result = train_model(model, copy_task_batches(s, vocab), s, library)
    if s.save and library == "fastpeft":
        import fastpeft

        fastpeft.save_adapter(model, s.save)
    return result


def train_model(model, batches, s: FinetuneSettings, library: str = "fastpeft", leave_bar: bool = True) -> RunResult:
    """Train `model` (its method applied) on `batches`, s.steps of them, each ``(input_ids, labels)``
    or ``(input_ids, labels, attention_mask)``; measure speed and the peak memory above the model as
    it is now. Leaves the model in train mode."""
    from tqdm import tqdm

    from .methods import count_parameters

    model.train()
    trainable, total = count_parameters(model)
    opt = make_optimizer(model, s)
    penalty = regulariser(s)
    result = RunResult(library, s.method, s.steps, 0, trainable_params=trainable, total_params=total)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    else:
        base_mem = rss_mb()  # read before the reset: the peak after it is at least this
        reset_peak_rss()
    timed_tokens, timed_seconds = 0, 0.0
    bar = tqdm(batches, total=s.steps, desc=f"{library} {s.method}", disable=not s.progress, unit="step",
               leave=leave_bar)
    start = time.perf_counter()
    for step, (ids, labels, *mask) in enumerate(bar):
        t0 = time.perf_counter()
        kwargs = {"attention_mask": mask[0].to(s.device)} if mask and mask[0] is not None else {}
        loss = model(input_ids=ids.to(s.device), labels=labels.to(s.device), **kwargs).loss
        opt.zero_grad(set_to_none=True)
        (loss + penalty(model) if penalty else loss).backward()  # the task loss is what is reported
        opt.step()
        loss_value = loss.item()  # synchronises the GPU: the step's time is complete
        dt = time.perf_counter() - t0
        result.losses.append(loss_value)
        result.tokens_per_step = result.tokens_per_step or ids.numel()
        if step > 0:  # the first step pays one-off costs (allocation, kernel compilation)
            timed_tokens += ids.numel()
            timed_seconds += dt
        tok_s = timed_tokens / timed_seconds if timed_seconds else 0.0
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
        if s.log_every and (step + 1) % s.log_every == 0:
            bar.write(f"[{library}] step {step + 1:4d}  loss {loss_value:.4f}  tokens/s {tok_s:,.0f}")
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    result.step_seconds = timed_seconds / (len(result.losses) - 1) if len(result.losses) > 1 else 0.0
    if s.device == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 - base_mem
        result.memory_kind = "CUDA memory allocated above the model, peak"
    else:
        result.peak_memory_mb = peak_rss_mb() - base_mem
        result.memory_kind = "process RSS above the loaded model, peak"
    return result


def _child(fn, args, queue) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def in_fresh_process(fn, *args, context: str = "spawn"):
    """``fn(*args)`` in a new process (`fn` a module-level function, its result picklable): the
    process's peak memory then belongs to this run alone. Raises RuntimeError with the child's
    error, or when the child dies without a word (killed for memory, say)."""
    import queue as queue_module

    ctx = mp.get_context(context)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have answered just before exiting
                    status, payload = queue.get(timeout=1.0)
                    break
                except queue_module.Empty:
                    raise RuntimeError(f"the run's process died (exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _train_as_dict(s: FinetuneSettings, library: str) -> dict:
    return asdict(train(s, library))


def train_in_fresh_process(s: FinetuneSettings, library: str) -> RunResult:
    """Run :func:`train` in a spawned process: peak memory then belongs to this run alone."""
    try:
        return RunResult(**in_fresh_process(_train_as_dict, s, library))
    except RuntimeError as e:
        raise RuntimeError(f"{library} training failed: {e}") from None


def format_results(results: list[RunResult]) -> str:
    rows = [("library", "method", "steps", "first loss", "final loss", "tokens/s", "peak MB", "trainable params",
             "seconds")]
    windows = set()
    for r in results:
        first, final, n = r.first_and_final_loss()
        windows.add(n)
        rows.append((r.library, r.method, str(r.steps), f"{first:.4f}", f"{final:.4f}",
                     f"{r.tokens_per_s:,.0f}", f"{r.peak_memory_mb:,.1f}",
                     f"{r.trainable_params:,d} / {r.total_params:,d}", f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    steps = "/".join(str(n) for n in sorted(windows))
    lines.append(f"(first/final loss: mean of the first/last {steps} steps; peak MB: {results[0].memory_kind})")
    if len(results) == 2 and results[1].tokens_per_s:
        a, b = results
        lines.append(f"{a.library}/{b.library}: tokens/s x{a.tokens_per_s / b.tokens_per_s:.3f}, "
                     f"peak memory x{a.peak_memory_mb / b.peak_memory_mb:.3f}" if b.peak_memory_mb > 0 else "")
    return "\n".join(lines)


def run(s: FinetuneSettings, compare: str | None = None, json_path: str | None = None) -> list[RunResult]:
    libraries = ["fastpeft"] + ([compare] if compare else [])
    results = [train_in_fresh_process(s, lib) for lib in libraries]
    print(format_results(results))
    if s.save:
        fmt = "PEFT format" if s.method in LORA_METHODS + ("prompt", "prefix", "ia3") else "fastpeft format"
        print(f"adapter saved to {s.save} ({fmt})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(settings=asdict(s), results=[asdict(r) for r in results]), f, indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    return results
