"""QLoRA past one process: FSDP2 (fully_shard) with the 4-bit base sharded, and DDP; gloo, CPU."""

import contextlib
import os
import time

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("this torch is built without torch.distributed", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import backends  # noqa: E402
from fastpeft.nn import Linear4bit, LoRALinear  # noqa: E402
from fastpeft.nn.dtypes import is_dtensor  # noqa: E402
from fastpeft.ops import record_faces  # noqa: E402

from conftest import assert_close  # noqa: E402
from models import VOCAB, tiny_model  # noqa: E402


@pytest.mark.parametrize("double_quant", [False, True])
def test_shard_quant_state_holds_the_scales_as_a_shardable_parameter(double_quant):
    """FSDP2 shards parameters, never buffers: with shard_quant_state the per-block scales become a
    frozen uint8 parameter (a row of 4 bytes per float32 scale, so no shard splits one) that no
    mixed-precision cast touches; the layer computes and saves exactly as before, and back."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    x = torch.randn(3, 96)
    before, state = layer(x), layer.state_dict()
    assert layer.shard_quant_state() is layer
    params = dict(layer.named_parameters())
    blocks = 96 * 40 // 64
    assert params["absmax"].dtype == torch.uint8 and not params["absmax"].requires_grad
    assert params["absmax"].shape == ((blocks,) if double_quant else (blocks, 4))
    assert "absmax" not in dict(layer.named_buffers())
    assert torch.equal(layer(x), before)
    after = layer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    other = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant).shard_quant_state()
    other.load_state_dict(state)
    assert torch.equal(other(x), before) and other.absmax.dtype == torch.uint8
    layer.to(torch.bfloat16)  # a model-wide cast leaves the scales' bytes alone
    assert torch.equal(layer.state_dict()["weight.absmax"], state["weight.absmax"])
    layer.shard_quant_state(False)
    assert "absmax" in dict(layer.named_buffers()) and torch.equal(layer.absmax, state["weight.absmax"])


def test_a_cast_of_the_packed_bytes_is_refused_not_computed():
    """FSDP2's MixedPrecisionPolicy casts floating parameters: bytes stored as bf16 and cast to fp16
    would be different bytes. The layer refuses them, naming the fix."""
    layer = Linear4bit.from_linear(nn.Linear(64, 32), quant_storage=torch.bfloat16)
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.float16), requires_grad=False)
    with pytest.raises(RuntimeError, match="quant_storage=torch.uint8"):
        layer(torch.randn(2, 64))


# ------------------------------------------------------------------ two processes, gloo

WORLD = 2
STEPS = 4


def _tiny_qlora(quant_storage=torch.uint8, double_quant=False, bf16_base=False):
    """A tiny Llama (hidden 64: whole NF4 blocks per row), 4-bit, with LoRA on every linear.
    bf16_base: the model in bf16 before quantising (the 4-bit layers compute in bf16) and the
    adapters float32, as mixed-precision QLoRA trains."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    if bf16_base:
        model.to(torch.bfloat16)
    fastpeft.quantize_model(model, double_quant=double_quant, quant_storage=quant_storage)
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                init_lora_weights=False))
    if bf16_base:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


def _global_batch():
    return torch.randint(0, VOCAB, (2 * WORLD, 9), generator=torch.Generator().manual_seed(3))


def _train(model, ids, params=None):
    """Adam over the trainable parameters; the losses (each rank's mean over its rows, averaged over
    the ranks when distributed: with equal row lengths, the global batch's mean)."""
    opt = torch.optim.Adam(params or [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def _nf4_bytes(model) -> dict[str, int]:
    """Bytes this process holds of the 4-bit layers: the sharded (weight, absmax when a parameter)
    and the replicated (buffers), each DTensor counted by its local shard."""
    out = {"params": 0, "buffers": 0}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for kind, tensors in (("params", m.parameters(recurse=False)), ("buffers", m.buffers(recurse=False))):
                for t in tensors:
                    t = t.to_local() if is_dtensor(t) else t
                    out[kind] += t.numel() * t.element_size()
    return out


def _gather_probe(model) -> list[bool]:
    """Forward pre-hooks on every Linear4bit: True when, as it runs, its own weight is the whole
    gathered tensor and the other decoder layer's weights are shards (one layer gathered at a time)."""
    layers = [list(m for m in layer.modules() if isinstance(m, Linear4bit)) for layer in model.model.layers]
    seen = []

    def hook(i):
        def check(module, args):
            base = module.base_layer
            others = [m for j, ms in enumerate(layers) if j != i for m in ms]
            seen.append(not is_dtensor(base.weight) and base.weight.numel() * base.weight.element_size()
                        == (base.out_features * base.in_features + 1) // 2
                        and all(is_dtensor(m.weight) for m in others))
        return check

    for i, layer in enumerate(model.model.layers):
        for m in layer.modules():
            if isinstance(m, LoRALinear):  # (QLoRA reads its Linear4bit's bytes; it does not call it)
                m.register_forward_pre_hook(hook(i))
    return seen


def _rank_worker(rank, scenario, root):
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no network needed
    torch.set_num_threads(1)  # a forked child never enters the parent's thread pools
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        out = SCENARIOS[scenario](rank, root)
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp(rank, root, quant_storage, double_quant, meta=False, mixed_precision=False):
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = _tiny_qlora(quant_storage, double_quant, bf16_base=mixed_precision)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else None
    fastpeft.shard_model(model, mp_policy=mp_policy)
    if meta:  # materialise: this rank's shards of the full checkpoint
        model.to_empty(device="cpu")
        full = torch.load(os.path.join(root, "full.pt"), weights_only=True)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        rotary = model.model.rotary_emb
        fresh = type(rotary)(model.config)
        for name in rotary._non_persistent_buffers_set:
            getattr(rotary, name).copy_(getattr(fresh, name))
    ids = _global_batch()[2 * rank: 2 * rank + 2]
    seen = _gather_probe(model)
    stored = _nf4_bytes(model)
    with record_faces() as faces:
        losses = _train(model, ids)
    fastpeft.save_adapter(model, os.path.join(root, "adapter"))  # every rank gathers, rank 0 writes
    model.save_pretrained(os.path.join(root, "pretrained"))
    return {"losses": losses, "stored": stored, "gathered": seen, "faces": sorted(set(faces))}


def _ddp(rank, root, quant_storage, double_quant):
    model = _tiny_qlora(quant_storage, double_quant)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = _global_batch()[2 * rank: 2 * rank + 2]
    with record_faces() as faces:
        losses = _train(ddp, ids)
    fastpeft.save_adapter(model, os.path.join(root, "adapter"))
    return {"losses": losses, "stored": _nf4_bytes(model), "faces": sorted(set(faces))}


SCENARIOS = {
    "fsdp2-uint8": lambda rank, root: _fsdp(rank, root, torch.uint8, False),
    "fsdp2-bf16-double": lambda rank, root: _fsdp(rank, root, torch.bfloat16, True),
    "fsdp2-meta": lambda rank, root: _fsdp(rank, root, torch.uint8, False, meta=True),
    "fsdp2-meta-double": lambda rank, root: _fsdp(rank, root, torch.uint8, True, meta=True),
    "fsdp2-bf16-mixed-precision": lambda rank, root: _fsdp(rank, root, torch.uint8, True, mixed_precision=True),
    "ddp-uint8": lambda rank, root: _ddp(rank, root, torch.uint8, False),
    "ddp-bf16-double": lambda rank, root: _ddp(rank, root, torch.bfloat16, True),
}


def _run_ranks(scenario, root, timeout=60.0) -> list[dict]:
    """Run a scenario on WORLD forked processes (they inherit the imported torch, transformers and
    fastpeft: seconds, where spawned ones would import them again); their results, rank by rank.
    Killed and failed past `timeout` seconds."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the ranks are forked processes; this platform cannot fork")
    ctx = mp.start_processes(_rank_worker, args=(scenario, str(root)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: the ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _one_process(quant_storage, double_quant, bf16_base=False):
    model = _tiny_qlora(quant_storage, double_quant, bf16_base)
    with record_faces() as faces:
        losses = _train(model, _global_batch())
    return model, losses, sorted(set(faces))


def _assert_adapter_is_the_one_process_adapter(directory, model):
    saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
    mine = {k: v.detach() for k, v in fastpeft.checkpoint.adapter_state_dict(model).items()}
    assert saved.keys() == mine.keys()
    for key in mine:  # whole tensors, not shards; Adam's steps agree to float32's reduction order
        assert saved[key].shape == mine[key].shape, key
        assert_close(saved[key], mine[key], torch.float32)


@pytest.mark.parametrize("scenario,storage,double_quant", [("fsdp2-uint8", torch.uint8, False),
                                                           ("fsdp2-bf16-double", torch.bfloat16, True)])
def test_fsdp2_qlora_shards_the_4bit_base_and_trains_as_one_process(scenario, storage, double_quant, tmp_path):
    """FSDP2 over a QLoRA Llama on 2 gloo processes, each taking half the global batch: each holds
    half of the packed NF4 bytes and of the scales, gathers one decoder layer's at a time, runs the
    same fused kernels as one process, and the loss curve is one process's on the global batch; the
    saved adapter holds the whole tensors, rank 0 writing."""
    model, losses, faces = _one_process(storage, double_quant)  # first: the ranks fork from a warm process
    ranks = _run_ranks(scenario, tmp_path)
    for r in ranks:
        assert_close(torch.tensor(r["losses"]), torch.tensor(losses), torch.float32)
        assert r["faces"] == faces and ("nf4_matmul", "cpu" if backends.extension() else "torch") in faces
        assert r["gathered"] and all(r["gathered"])
    whole = _nf4_bytes(model)
    tables = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, Linear4bit)
                 for n, t in m.named_buffers() if n != "absmax")  # the 16 levels, double quant's table
    for r in ranks:
        sharded = whole["params"] + whole["buffers"] - tables
        assert r["stored"]["buffers"] == tables  # only the constant-size tables are replicated
        assert r["stored"]["params"] <= sharded / WORLD + 64 * 14, (r["stored"], whole)  # + padding per layer
    print(f"{scenario}: per-rank 4-bit storage {sum(ranks[0]['stored'].values())} B of "
          f"{sum(whole.values())} B in one process")
    _assert_adapter_is_the_one_process_adapter(tmp_path / "adapter", model)
    _assert_adapter_is_the_one_process_adapter(tmp_path / "pretrained", model)
    assert (tmp_path / "pretrained" / "adapter_config.json").exists()


@pytest.mark.parametrize("double_quant", [False, True])
def test_fsdp2_qlora_built_on_meta_and_loaded_shard_by_rank(double_quant, tmp_path):
    """The big-model path: each rank builds the QLoRA model on the meta device, shards it, makes
    room for its shards only (to_empty) and loads them from a full state dict (float32 scales or
    double quantisation's codes, into the sharded scales' bytes); it then trains as one process does."""
    torch.save(_tiny_qlora(torch.uint8, double_quant).state_dict(), tmp_path / "full.pt")
    _, losses, _ = _one_process(torch.uint8, double_quant)
    ranks = _run_ranks("fsdp2-meta-double" if double_quant else "fsdp2-meta", tmp_path)
    for r in ranks:
        assert_close(torch.tensor(r["losses"]), torch.tensor(losses), torch.float32)


@pytest.mark.parametrize("scenario,storage,double_quant", [("ddp-uint8", torch.uint8, False),
                                                           ("ddp-bf16-double", torch.bfloat16, True)])
def test_ddp_qlora_trains_as_one_process(scenario, storage, double_quant, tmp_path):
    model, losses, faces = _one_process(storage, double_quant)
    ranks = _run_ranks(scenario, tmp_path)
    for r in ranks:
        assert_close(torch.tensor(r["losses"]), torch.tensor(losses), torch.float32)
        assert r["faces"] == faces
    _assert_adapter_is_the_one_process_adapter(tmp_path / "adapter", model)


def test_fsdp2_mixed_precision_over_a_bf16_qlora_base(tmp_path):
    """The usual mixed-precision QLoRA: a bf16 base quantised, float32 adapters all-gathered as bf16
    (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)); the 4-bit bytes (uint8) and
    the scales' bytes pass through the policy uncast. The loss curve is one process's over the
    same model (adapters used in bf16 there too), to bf16's tolerance."""
    _, losses, faces = _one_process(torch.uint8, True, bf16_base=True)
    ranks = _run_ranks("fsdp2-bf16-mixed-precision", tmp_path)
    for r in ranks:
        assert_close(torch.tensor(r["losses"]), torch.tensor(losses), torch.bfloat16)
        assert r["faces"] == faces and r["gathered"] and all(r["gathered"])


def test_shard_model_refuses_a_policy_that_would_cast_the_4bit_bytes():
    model = _tiny_qlora(torch.bfloat16, True)
    with pytest.raises(ValueError, match="would rewrite 4-bit weights stored as torch.bfloat16"):
        fastpeft.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
    assert not any(m.quant_state_sharded for m in model.modules() if isinstance(m, Linear4bit))


def test_decoder_layers_are_the_no_split_modules():
    model = _tiny_qlora()
    assert fastpeft.distributed.decoder_layers(model) == list(model.model.layers)
