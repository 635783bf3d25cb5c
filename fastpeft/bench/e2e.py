"""End to end on a real model (SmolLM2-135M-Instruct, a 30-layer Llama, from :mod:`fastpeft.models`),
each of fastpeft's paths beside its peer on the same weights, timed interleaved in one run:

* ``4-bit generation``: greedy generation of 64 new tokens for one prompt by the bf16 model
  (``bf16``, the baseline), the same model with :func:`fastpeft.quantize_model` (``fastpeft``, NF4,
  double quantisation, computing in bf16) and loaded by transformers with bitsandbytes NF4
  (``bitsandbytes``: the same settings, in eval mode, its fastest CPU path: it repacks its weights
  for its AVX512_BF16 kernel outside training only). ``floor``: the bf16 model with every layer
  quantize_model would quantise answering zeros at once and its output layer as quantize_model
  leaves it (a :class:`~fastpeft.nn.DenseLinear`): what the rest of fastpeft's token costs
  (attention, norms, the output layer, generate's own work), the least its 4-bit model could take;
  bf16/floor is the most faster 4-bit layers could gain over bf16 on this machine.
* ``LoRA generation``: greedy generation of 64 new tokens for one prompt with one LoRA adapter
  (r = 16, every linear layer) kept unmerged, as a model that switches adapters keeps it: the bf16
  model without it (``bf16``), fastpeft's LoRA layers (:func:`fastpeft.load_adapter`) and PEFT's
  (``peft``, adapters in bf16), both reading the same PEFT checkpoint.
* ``8-adapter generation``: a batch of 8 requests, each with its own of 8 LoRA adapters (r = 16,
  every linear layer), 64 new tokens each: the base model without adapters (``bf16``), a
  :class:`fastpeft.AdapterPool` and PEFT's ``generate(..., adapter_names=[...])`` (``peft``; its
  adapters kept in bf16, ``autocast_adapter_dtype=False``: its faster setting, and the pool's dtype).
  Both read the same PEFT checkpoints.
* ``QLoRA step``: one training step (forward, backward, AdamW) of LoRA r = 16 on every linear
  layer: on the bf16 model unquantised (``bf16``, fastpeft's LoRA), on fastpeft's NF4 model
  (``fastpeft``), and PEFT on transformers + bitsandbytes NF4 (``peft+bitsandbytes``, adapters in
  bf16 as fastpeft's; no gradient checkpointing in either).

Times are per call (a whole generation, a whole step); each row also carries ``ms_per_token`` for
the generations (per new token of one request's sequence, the batch's tokens generated together).
``--quick`` runs the same code on a tiny random Llama built from a transformers config (2 layers,
4 new tokens), so CI exercises it without the real model. Loading SmolLM2 converts its GGUF once
(about 30-50 s here, cached in ``$FASTPEFT_CACHE``); later loads take well under a second.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import torch

from .case import AT_LEAST, AT_MOST, BenchOp, Case, Target, Variants

ISSUE_18 = "issue 18, Targets"
MODEL = "smollm2"
PROMPT = "The capital of France is"
NEW_TOKENS = 64
ADAPTERS = 8
RANK = 16
# The QLoRA step's batch: 4 sequences of 128 tokens
STEP_BATCH, STEP_SEQ = 4, 128
QUICK_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

GENERATE, LORA_GENERATE, ADAPTER_GENERATE, QLORA_STEP = ("4-bit generation", "LoRA generation", "8-adapter generation",
                                                         "QLoRA step")


def cases(device: str, quick: bool) -> list[Case]:
    model = "tiny-llama" if quick else "SmolLM2-135M"
    tokens = 4 if quick else NEW_TOKENS
    if quick:
        return [Case(GENERATE, "fwd", "bf16", dict(model=model, batch=1, new_tokens=tokens), modules="eval"),
                Case(LORA_GENERATE, "fwd", "bf16", dict(model=model, batch=1, new_tokens=tokens, r=4), modules="eval"),
                Case(ADAPTER_GENERATE, "fwd", "bf16", dict(model=model, batch=4, new_tokens=tokens, adapters=4, r=4),
                     modules="eval"),
                Case(QLORA_STEP, "fwd+bwd", "bf16", dict(model=model, batch=2, seq=8, r=4), modules="train")]
    return [
        Case(GENERATE, "fwd", "bf16", dict(model=model, batch=1, new_tokens=tokens), (
            Target("fastpeft/bitsandbytes", AT_MOST, 1.0, "fastpeft NF4 generation over bitsandbytes NF4 (eval), "
                   "SmolLM2, greedy, 64 tokens", ISSUE_18),
            Target("bf16/fastpeft", AT_LEAST, 1.5, "the bf16 model's generation over fastpeft NF4's, SmolLM2, greedy, "
                   "64 tokens", ISSUE_18)), modules="eval"),
        Case(LORA_GENERATE, "fwd", "bf16", dict(model=model, batch=1, new_tokens=tokens, r=RANK), modules="eval"),
        Case(ADAPTER_GENERATE, "fwd", "bf16",
             dict(model=model, batch=ADAPTERS, new_tokens=tokens, adapters=ADAPTERS, r=RANK), (
                 Target("peft/fastpeft", AT_LEAST, 1.5, "PEFT's generate(adapter_names=) over fastpeft's AdapterPool, "
                        "8 adapters in a batch of 8", ISSUE_18),), modules="eval"),
        Case(QLORA_STEP, "fwd+bwd", "bf16", dict(model=model, batch=STEP_BATCH, seq=STEP_SEQ, r=RANK), modules="train"),
    ]


# ------------------------------------------------------------------------------ the models

@functools.lru_cache(maxsize=None)
def model_folder(quick: bool) -> str:
    """The folder transformers loads: SmolLM2 (converted once into the cache), or for --quick a
    tiny random Llama (seed 0) written once per process to a temporary folder, removed at exit."""
    if not quick:
        from ..models import model_dir
        return model_dir(MODEL)
    import transformers as tf

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="fastpeft-e2e-")
    atexit.register(shutil.rmtree, folder, True)
    tf.LlamaForCausalLM(tf.LlamaConfig(**QUICK_CONFIG)).save_pretrained(folder)
    return folder


def load_bf16(folder: str, device: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()


def load_bitsandbytes(folder: str, device: str):
    """The model as a transformers user loads it in 4 bits (NF4, double quantisation, bf16 compute);
    None when bitsandbytes is absent or has no backend for `device`."""
    import transformers as tf

    try:
        import bitsandbytes  # noqa: F401
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
        return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config,
                                                       device_map=device).eval()
    except Exception:  # bitsandbytes absent or without a backend here: no peer column
        return None


def load_fastpeft_nf4(folder: str, device: str):
    from ..quantize import quantize_model

    return quantize_model(load_bf16(folder, device), double_quant=True).eval()


class ZeroLinear(torch.nn.Module):
    """A linear layer that costs nothing: zeros of its output's shape (the floor variant)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def load_floor(folder: str, device: str):
    """The bf16 model with every linear layer quantize_model would quantise (the output layer and
    heads kept, by the same rule) replaced by a ZeroLinear, and the output layer as quantize_model
    leaves it (a DenseLinear): fastpeft's model without the cost of its 4-bit layers."""
    from ..quantize import dense_output_layers, full_precision_modules, quantized_module_names
    from ..targeting import replace_module

    model = load_bf16(folder, device)
    for name in quantized_module_names(model, full_precision_modules(model)):
        replace_module(model, name, ZeroLinear(model.get_submodule(name).out_features))
    dense_output_layers(model)
    return model


def prompt_ids(folder: str, batch: int, device: str, quick: bool) -> torch.Tensor:
    """[batch, seq] token ids: the prompt through the model's tokenizer, or for --quick seeded random ids."""
    if quick:
        return torch.randint(1, QUICK_CONFIG["vocab_size"], (1, 6),
                             generator=torch.Generator().manual_seed(0)).repeat(batch, 1).to(device)
    import transformers as tf

    ids = tf.AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]
    return ids.repeat(batch, 1).to(device)


def generation(model, ids: torch.Tensor, tokens: int, **kwargs):
    """One greedy generation of exactly `tokens` new tokens per sequence (end-of-text suppressed)."""
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    pad = pad[0] if isinstance(pad, list) else pad

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                                  min_new_tokens=tokens, pad_token_id=pad, **kwargs)
    return run


# ------------------------------------------------------------------------------ the variants

def generate_variants(case: Case, device: str, quick: bool) -> Variants:
    folder = model_folder(quick)
    ids = prompt_ids(folder, case.dims["batch"], device, quick)
    tokens = case.dims["new_tokens"]
    out = {"bf16": generation(load_bf16(folder, device), ids, tokens),
           "fastpeft": generation(load_fastpeft_nf4(folder, device), ids, tokens)}
    peer = load_bitsandbytes(folder, device)
    if peer is not None:
        out["bitsandbytes"] = generation(peer, ids, tokens)
    out["floor"] = generation(load_floor(folder, device), ids, tokens)
    return out


def peft_lora_config(r: int, **kwargs):
    import peft

    return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", **kwargs)


def peft_with_adapters(folder: str, device: str, names: list[str], r: int):
    """The bf16 model with PEFT's random LoRA adapters `names` (seed 0), in eval mode, the adapters
    in bf16 (``autocast_adapter_dtype=False``: PEFT's faster setting)."""
    import peft

    torch.manual_seed(0)
    # init_lora_weights=False: A and B random, so every adapter changes the model
    config = peft_lora_config(r, init_lora_weights=False)
    model = peft.get_peft_model(load_bf16(folder, device), config, adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        model.add_adapter(name, config, autocast_adapter_dtype=False)
    return model.eval()


def lora_variants(case: Case, device: str, quick: bool) -> Variants:
    """One random LoRA adapter made with PEFT and saved; fastpeft loads the same checkpoint."""
    from ..checkpoint import load_adapter

    folder = model_folder(quick)
    ids = prompt_ids(folder, case.dims["batch"], device, quick)
    tokens = case.dims["new_tokens"]
    peft_model = peft_with_adapters(folder, device, ["default"], case.dims["r"])
    with tempfile.TemporaryDirectory(prefix="fastpeft-e2e-adapter-") as checkpoint:
        peft_model.save_pretrained(checkpoint)
        model = load_adapter(load_bf16(folder, device), checkpoint)
    return {"bf16": generation(load_bf16(folder, device), ids, tokens),
            "fastpeft": generation(model, ids, tokens),
            "peft": generation(peft_model, ids, tokens)}


def adapter_variants(case: Case, device: str, quick: bool) -> Variants:
    """8 (--quick: 4) random LoRA adapters made with PEFT and saved as checkpoints; PEFT serves them
    by adapter_names (its mixed batch is an inference path only), an AdapterPool loads the same
    checkpoints."""
    from ..pool import AdapterPool

    folder = model_folder(quick)
    batch, tokens, count, r = (case.dims[k] for k in ("batch", "new_tokens", "adapters", "r"))
    ids = prompt_ids(folder, batch, device, quick)
    names = [f"adapter{i}" for i in range(count)]
    peft_model = peft_with_adapters(folder, device, names, r)
    pool_model = load_bf16(folder, device)
    pool = AdapterPool(pool_model, max_adapters=count, max_rank=r)
    with tempfile.TemporaryDirectory(prefix="fastpeft-e2e-adapters-") as checkpoints:
        peft_model.save_pretrained(checkpoints, selected_adapters=names)
        for name in names:
            pool.load(name, checkpoint_path(checkpoints, name, names[0]))
    requests = [names[i % count] for i in range(batch)]
    return {"bf16": generation(load_bf16(folder, device), ids, tokens),
            "fastpeft": generation(pool_model, ids, tokens, adapter_names=requests),
            "peft": generation(peft_model, ids, tokens, adapter_names=requests)}


def checkpoint_path(root: str, name: str, first: str) -> str:
    """Where PEFT's save_pretrained put adapter `name`: the first at the root when it is named
    "default", else each in a folder of its name."""
    nested = os.path.join(root, name)
    return nested if os.path.isdir(nested) or name != first else root


def training_step(model, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def qlora_variants(case: Case, device: str, quick: bool) -> Variants:
    import fastpeft

    folder = model_folder(quick)
    batch, seq, r = (case.dims[k] for k in ("batch", "seq", "r"))
    vocab = QUICK_CONFIG["vocab_size"] if quick else load_config_vocab(folder)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    config = fastpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
    torch.manual_seed(0)
    out = {"bf16": fastpeft.get_peft_model(load_bf16(folder, device), config),
           "fastpeft": fastpeft.get_peft_model(load_fastpeft_nf4(folder, device), config)}
    peer = load_bitsandbytes(folder, device)
    if peer is not None:
        import peft

        out["peft+bitsandbytes"] = peft.get_peft_model(peer, peft_lora_config(r), autocast_adapter_dtype=False)
    for model in out.values():
        model.train()
    return {name: training_step(model, ids) for name, model in out.items()}


def load_config_vocab(folder: str) -> int:
    import transformers as tf

    return tf.AutoConfig.from_pretrained(folder).vocab_size


BUILDERS = {GENERATE: generate_variants, LORA_GENERATE: lora_variants, ADAPTER_GENERATE: adapter_variants,
            QLORA_STEP: qlora_variants}


def variants(case: Case, device: str) -> Variants:
    return BUILDERS[case.label](case, device, case.dims["model"] == "tiny-llama")


def derive_ratios(rows: list[dict]) -> None:
    """Per-token times of the generations: a call's time over its new tokens; where the floor ran,
    bf16/floor, the most faster 4-bit layers could speed bf16's generation up here."""
    for row in rows:
        if "new_tokens" in row:
            row["ms_per_token"] = {name: ms / row["new_tokens"] for name, ms in row["times_ms"].items()}
        if "floor" in row["times_ms"]:
            row["ratios"]["bf16/floor"] = row["times_ms"]["bf16"] / row["times_ms"]["floor"]


# One warm-up call (bitsandbytes repacks its weights on its first eval call), then 5 timed rounds:
# a round of the three generations took about a minute on the 2 shared vCPUs.
BENCH = BenchOp("e2e", cases, variants, baseline="bf16", peers=("bitsandbytes", "peft", "peft+bitsandbytes"),
                reference=None, derive_ratios=derive_ratios, repetitions=(1, 5))
