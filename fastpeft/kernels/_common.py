"""Helpers shared by the Triton kernels of fastpeft."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr):
    """``acc + a·b``. BF16_VIA_FP32 is set only under the CPU interpreter, whose bf16 ``tl.dot``
    returns garbage (Triton 3.8: values ~1e10 for O(1) inputs). Upcasting is exact (a product of
    two bf16 values fits in fp32), so the interpreter computes what the GPU's bf16 MMA computes."""
    if BF16_VIA_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def bf16_via_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreting()


def input_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own switch: full-precision products unless the user allowed TF32."""
    if dtype != torch.float32:
        return "tf32"  # not used for half types
    try:
        allow = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the user set the newer fp32_precision API; reading the legacy flag then raises
        allow = torch.backends.cuda.matmul.fp32_precision == "tf32"
    return "tf32" if allow else "ieee"


BLOCK_R_CHOICES = (16, 32, 64)  # tl.dot needs >= 16; ranks above 64 loop over 64-wide chunks


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in host code. Triton 3.6's triton.cdiv and triton.next_power_of_2 are constexpr
    functions, whose wrapper unwraps every argument on each call: the 26 such calls of a LoRA
    forward's launch plan cost ~50 us of its ~130 (a 2-vCPU Zen 4, launches stubbed out)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2), in host code."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def block_r(R: int) -> int:
    return min(max(16, next_power_of_2(max(R, 1))), BLOCK_R_CHOICES[-1])


TRITON_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- shared memory per block

# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute
# capability: the limit Triton checks a kernel's ``metadata.shared`` against at launch.
SMEM_PER_BLOCK_OPTIN = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_smem_limits: dict[int, int] = {}       # device index -> its limit, queried once
_smem_override: list[int | None] = [None]


def set_smem_limit_override(limit: int | None) -> None:
    """Tile choice for a given limit instead of the device's (ahead-of-time compilation and the
    static model record launches for an architecture on CPU tensors); None restores the device's."""
    _smem_override[0] = limit


def smem_limit(device: torch.device) -> int:
    """Shared memory per block the launch may use on `device`, cached per device index."""
    return _per_device(device, _smem_override, _smem_limits, SMEM_PER_BLOCK_OPTIN[90],
                       lambda props: props.shared_memory_per_block_optin)


def _per_device(device: torch.device, override: list, cache: dict, off_cuda: int, read) -> int:
    """The override when set; `off_cuda` for a tensor not on a GPU (the interpreter plans for
    sm_90); else read(the device's properties), queried once per device index."""
    if override[0] is not None:
        return override[0]
    if device.type != "cuda":
        return off_cuda
    index = device.index if device.index is not None else torch.cuda.current_device()
    value = cache.get(index)
    if value is None:
        value = cache[index] = read(torch.cuda.get_device_properties(index))
    return value


# ---------------------------------------------------------------- streaming multiprocessors

# SMs by compute capability, for launches planned without the device (the static model, CI's
# compile list): H100/H200, A100, RTX 3090 class, RTX 4090/L40S class. A GPU reports its own.
SM_COUNT = {80: 108, 86: 82, 89: 128, 90: 132}
_sm_counts: dict[int, int] = {}         # device index -> its SMs, queried once
_sm_override: list[int | None] = [None]
_short_grid_note: list[str | None] = [None]


def set_sm_count_override(count: int | None) -> None:
    """Plan grids for `count` SMs instead of the device's (see set_smem_limit_override); None restores."""
    _sm_override[0] = count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (multi_processor_count, cached per device index); a
    launch whose grid has fewer programs than this leaves SMs idle for its whole run. Non-CUDA
    tensors (the interpreter) plan for sm_90's 132."""
    return _per_device(device, _sm_override, _sm_counts, SM_COUNT[90], lambda props: props.multi_processor_count)


def wave_split(programs: int, blocks: int, sms: int) -> int:
    """Parts to split a reduction of `blocks` blocks into so that `programs`·parts reaches `sms`
    (one program per SM at least): the fewest that do, at most one part per block; 1 when the grid
    already fills a wave."""
    if programs >= sms or blocks <= 1:
        return 1
    per_part = max(1, blocks // cdiv(sms, programs))
    return cdiv(blocks, per_part)


def note_short_grid(reason: str) -> None:
    """Why the next launch's grid has fewer programs than the device has SMs (a launch below one
    wave). The static model (fastpeft.kernels.aot.record_launches) attaches it to that launch and
    fails a short grid without one; on a GPU it is never read."""
    _short_grid_note[0] = reason


def take_short_grid_note() -> str | None:
    """The reason noted for the launch being made, cleared for the next one."""
    reason, _short_grid_note[0] = _short_grid_note[0], None
    return reason


# ---------------------------------------------------------------- roofline figures

# What an architecture computes and moves per second: dense bf16/fp16 tensor-core peak (FLOP/s)
# and effective HBM bandwidth (bytes/s; issue 15: 4.3 TB/s of the H200's 4.8). The static model
# (fastpeft/bench/static.py) and the launchers' cost rules (kernels/lora_linear.py: fwd_estimates)
# read them here: H200, A100-80GB, RTX 3090/A10, RTX 4090/L40S.
GPU_ROOFLINE = {90: dict(flops=790e12, bandwidth=4.3e12), 80: dict(flops=312e12, bandwidth=1.8e12),
                86: dict(flops=71e12, bandwidth=0.85e12), 89: dict(flops=165e12, bandwidth=0.9e12)}
_arch_override: list[int | None] = [None]
_archs: dict[int, int] = {}             # device index -> its planning architecture, read once


def set_arch_override(arch: int | None) -> None:
    """Cost rules plan for sm_`arch` instead of the device's (see set_smem_limit_override); None restores."""
    _arch_override[0] = arch


def gpu_arch(device: torch.device) -> int:
    """The compute capability (90 for sm_90) whose figures plan launches on `device`: the override
    when set; sm_90 off CUDA (the interpreter plans for it); else the device's, or the nearest known
    one below it (an unknown newer part is planned as the newest known), cached per device index."""
    def nearest(props):
        arch = props.major * 10 + props.minor
        known = [a for a in sorted(GPU_ROOFLINE) if a <= arch]
        return known[-1] if known else min(GPU_ROOFLINE)
    return _per_device(device, _arch_override, _archs, 90, nearest)


def fitting(tiles, limit: int):
    """The first of `tiles` (each ending in its shared memory in bytes, as compiled) within `limit`."""
    for tile in tiles:
        if tile[-1] <= limit:
            return tile
    return tiles[-1]


# ---------------------------------------------------------------- split reductions

@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, NUMEL, PARTS, stride_part, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = Σ_h part[h, i] over h < PARTS, fp32, rounded once to out's dtype; part's planes and
    out contiguous; grid ⌈NUMEL/BLOCK⌉. A trip loads BLOCK_P parts of BLOCK sums at once (64 loads
    in flight per thread: one trip for up to 64 parts), row j of the accumulator takes parts
    j, j + BLOCK_P, ... and the rows are summed last: a fixed order, the same sum every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK_P, BLOCK), dtype=tl.float32)
    for h0 in range(0, PARTS, BLOCK_P):
        h = h0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + h[:, None].to(tl.int64) * stride_part + offs[None, :],
                       mask=(h < PARTS)[:, None] & mask[None, :], other=0.0)
    tl.store(out_ptr + offs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask)


# A sum program: 64 parts x 128 sums per trip (64 fp32 per thread of 4 warps). The split kernels'
# parts are few sums each (T·R = 1024 for 64 decode tokens at rank 16), so the sum is latency-bound:
# its bytes in flight are all its loads of a trip, which is why parts are loaded side by side.
SUM_PARTS_TILE = (64, 128)


def sum_parts(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``parts[P, *shape]`` (contiguous float32: the partial sums of a reduction split into P parts)
    summed over P in a fixed order → a new contiguous ``[*shape]`` tensor of `dtype`. No atomics: a
    split kernel writes each part to its own plane and this adds them, so every run gives the same
    result. The split kernels (BGMV and SGMV shrinks, PHM's factor gradients) share it."""
    count = parts.shape[0]
    out = torch.empty(parts.shape[1:], device=parts.device, dtype=dtype)
    numel = out.numel()
    if numel == 0:
        return out
    block_p, block = SUM_PARTS_TILE
    programs = cdiv(numel, block)
    if programs < sm_count(parts.device):
        note_short_grid(f"adds {count} fp32 parts of {numel} sums, {block} per program: {programs} program(s), "
                        f"{block_p} parts loaded at once")
    wrap_triton(_sum_parts_kernel)[(programs,)](parts, out, numel, count, parts.stride(0), BLOCK_P=block_p,
                                                BLOCK=block, num_warps=4)
    return out


def aot_configs():
    """The split sum for each output dtype (its parts are always float32)."""
    for tname in TRITON_DTYPES:
        yield _sum_parts_kernel, {"part_ptr": "*fp32", "out_ptr": f"*{tname}", "NUMEL": "i32", "PARTS": "i32",
                                  "stride_part": "i32"}, dict(BLOCK_P=SUM_PARTS_TILE[0], BLOCK=SUM_PARTS_TILE[1]), \
            dict(num_warps=4)
