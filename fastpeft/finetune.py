"""``fastpeft finetune``: fine-tune a causal LM with a PEFT method; report loss, speed and memory.

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

METHODS = ("lora", "qlora")  # qlora: NF4 base (double-quantised), LoRA on top
BOS, SEP, FIRST_TOKEN = 1, 2, 4


@dataclass
class FinetuneSettings:
    method: str = "lora"
    model: str | None = None  # local Hugging Face model directory; None: the tiny default Llama
    steps: int = 300
    batch_size: int = 32
    pattern_length: int = 8
    lr: float = 5e-3
    r: int = 16
    lora_alpha: float = 32
    target_modules: str | list = "all-linear"
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

    def loss_at(self, start: int, end: int) -> float:
        window = self.losses[start:end]
        return sum(window) / len(window)


def default_model(seed: int, vocab_size: int = 64):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg)


def load_model(s: FinetuneSettings):
    if s.model is None:
        return default_model(s.seed)
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

    from .peft_model import _output_layer_names, _parent

    skip = _output_layer_names(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name not in skip:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
            parent, child = _parent(model, name)
            setattr(parent, child, q.to(module.weight.device))
    return model


def apply_method(model, s: FinetuneSettings, library: str):
    if s.method not in METHODS:
        raise ValueError(f"unknown method {s.method!r}; choose from {METHODS}")
    kwargs = dict(r=s.r, lora_alpha=s.lora_alpha, target_modules=s.target_modules)
    if library == "fastpeft":
        import fastpeft

        if s.method == "qlora":
            fastpeft.quantize_model(model, double_quant=True)
        return fastpeft.get_peft_model(model, fastpeft.LoraConfig(**kwargs))
    import peft

    if s.method == "qlora":
        _bnb_quantize(model, next(model.parameters()).dtype)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train(s: FinetuneSettings, library: str) -> RunResult:
    """One training run in this process."""
    from tqdm import tqdm

    from .peft_model import count_parameters

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.dtype]
    model = load_model(s).to(device=s.device, dtype=dtype)
    model = apply_method(model, s, library)  # (qlora: quantised here, so the peak includes the 4-bit base)
    model.train()
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr)
    vocab = model.get_input_embeddings().num_embeddings
    result = RunResult(library, s.method, s.steps, s.batch_size * (2 * s.pattern_length + 2),
                       trainable_params=trainable, total_params=total)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    else:
        base_mem = _rss_mb()
    timed_tokens, timed_seconds = 0, 0.0
    bar = tqdm(copy_task_batches(s, vocab), total=s.steps, desc=f"{library} {s.method}", disable=not s.progress,
               unit="step")
    start = time.perf_counter()
    for step, (ids, labels) in enumerate(bar):
        t0 = time.perf_counter()
        loss = model(input_ids=ids.to(s.device), labels=labels.to(s.device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()  # synchronises the GPU: the step's time is complete
        dt = time.perf_counter() - t0
        result.losses.append(loss_value)
        if step > 0:  # the first step pays one-off costs (allocation, kernel compilation)
            timed_tokens += ids.numel()
            timed_seconds += dt
        tok_s = timed_tokens / timed_seconds if timed_seconds else 0.0
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
        if s.log_every and (step + 1) % s.log_every == 0:
            bar.write(f"[{library}] step {step + 1:4d}  loss {loss_value:.4f}  tokens/s {tok_s:,.0f}")
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    if s.device == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 - base_mem
        result.memory_kind = "CUDA memory allocated above the model, peak"
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        result.peak_memory_mb = peak_rss - base_mem
        result.memory_kind = "process RSS above the loaded model, peak"
    if s.save and library == "fastpeft":
        import fastpeft

        fastpeft.save_adapter(model, s.save)
    return result


def _child(s: FinetuneSettings, library: str, queue) -> None:
    try:
        queue.put(("ok", asdict(train(s, library))))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def train_in_fresh_process(s: FinetuneSettings, library: str) -> RunResult:
    """Run :func:`train` in a spawned process: peak memory then belongs to this run alone."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(s, library, queue))
    proc.start()
    status, payload = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{library} training failed: {payload}")
    return RunResult(**payload)


def format_results(results: list[RunResult]) -> str:
    rows = [("library", "method", "steps", "first loss", "final loss", "tokens/s", "peak MB", "trainable params",
             "seconds")]
    for r in results:
        n = max(1, min(10, len(r.losses)))
        rows.append((r.library, r.method, str(r.steps), f"{r.loss_at(0, n):.4f}", f"{r.loss_at(-n, None):.4f}",
                     f"{r.tokens_per_s:,.0f}", f"{r.peak_memory_mb:,.1f}",
                     f"{r.trainable_params:,d} / {r.total_params:,d}", f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(first/final loss: mean of the first/last 10 steps; peak MB: {results[0].memory_kind})")
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
        print(f"adapter saved to {s.save} (PEFT format)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(settings=asdict(s), results=[asdict(r) for r in results]), f, indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    return results
