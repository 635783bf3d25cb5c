"""Triton face of ``phm_linear``: the Kronecker sum ``W = Σᵢ Aᵢ ⊗ Bᵢ`` applied from its factors.

With x viewed as ``[M, n, in/n]``, ``y[m, a, :] = Σᵢ Σ_b Aᵢ[a, b]·(Bᵢ·x[m, b, :])``. Two kernels do
all the work (indices: m token, a/b block, i term, c/d columns of a block):

``_phm_mix_kernel``    ``out[m, a, c] = Σᵢ Σ_b rule[i, a, b] · Σ_d inp[m, b, i, d]·w[i, c, d]``
    A program owns an ``[M-block, C-block]`` tile for *all* n output blocks a (an ``[NB, BM, BC]``
    fp32 accumulator): for each (i, b) it runs the d loop of one small GEMM tile
    ``U = inp[:, b, i, :]·w[i]ᵀ`` and spreads U over the n blocks with the rule's column
    ``Aᵢ[:, b]``. W, and the n-times-wider mixed input, never exist. It serves
      - the forward: inp = x (the same for every i: stride 0), w = B;
      - low rank ``Bᵢ = Sᵢ·Tᵢ``: inp = ``x·Tᵢᵀ`` (``[M, n, n, r]``, one skinny GEMM), w = S;
      - dx: inp = dy, rule → Aᵢᵀ, w → Bᵢᵀ (transposed views, no copies). With ``HAS_PARTIAL`` the
        same U tiles (``dy·Bᵢ`` blocks) are dotted with x's tile, giving each program's share of
        ``dAᵢ[a, b] = ⟨dy[:, a]·Bᵢ, x[:, b]⟩``; the shares are summed on the host (deterministic).
``_phm_grad_factor_kernel``  ``out[i, c, d] = Σ_m Σ_b (Σ_a rule[i, a, b]·l[m, a, i, c])·r[m, b, i, d]``
    The gradient of B (l = dy, r = x), and of S and T in the low-rank case: a GEMM reducing over
    the tokens whose left operand is mixed by Aᵢ in registers as it is loaded. A small gradient
    (Compacter's rank-1 factors: n·⌈C/BC⌉ tiles, 64 at n = 4) splits the tokens across programs
    until the grid fills the SMs (``factor_plan``), the parts summed in a fixed order.

Tiles come from a fixed table keyed by NB = n rounded up to a power of two (≤ 16), so every
configuration launched is listed in ``aot_configs`` and compiled ahead of time by CI.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreting
from ._common import (TRITON_DTYPES, bf16_via_fp32, cdiv, dot, input_precision, next_power_of_2, note_short_grid,
                      sm_count, sum_parts, wave_split)

MAX_PHM_DIM = 16


@triton.jit
def _phm_mix_kernel(
    inp_ptr, rule_ptr, w_ptr, bias_ptr, out_ptr, x2_ptr, part_ptr,
    M, NPHM, P, D,
    stride_im, stride_ib, stride_ii, stride_id,
    stride_ri, stride_ra, stride_rb,
    stride_wi, stride_wc, stride_wd,
    stride_om, stride_oa, stride_oc,
    stride_xm, stride_xa, stride_xc,
    HAS_BIAS: tl.constexpr, HAS_PARTIAL: tl.constexpr, NB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """out[M, n, P] (+ bias[a·P + c]); part[program, i, b, a] (fp32) when HAS_PARTIAL; see the module doc."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, NB)
    m_mask = offs_m < M
    c_mask = offs_c < P
    a_mask = offs_a < NPHM
    m64 = offs_m.to(tl.int64)
    mask3 = a_mask[:, None, None] & m_mask[None, :, None] & c_mask[None, None, :]

    acc = tl.zeros((NB, BLOCK_M, BLOCK_C), dtype=tl.float32)
    if HAS_PARTIAL:
        x2 = tl.load(x2_ptr + offs_a[:, None, None] * stride_xa + m64[None, :, None] * stride_xm
                     + offs_c[None, None, :] * stride_xc, mask=mask3, other=0.0).to(tl.float32)
    for i in range(0, NPHM):
        for b in range(0, NPHM):
            u = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D
                inp = tl.load(inp_ptr + m64[:, None] * stride_im + b * stride_ib + i * stride_ii
                              + d[None, :] * stride_id, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                w_t = tl.load(w_ptr + i * stride_wi + offs_c[None, :] * stride_wc + d[:, None] * stride_wd,
                              mask=c_mask[None, :] & d_mask[:, None], other=0.0)
                u = dot(inp, w_t, u, INPUT_PRECISION, BF16_VIA_FP32)
            rule_col = tl.load(rule_ptr + i * stride_ri + offs_a * stride_ra + b * stride_rb,
                               mask=a_mask, other=0.0).to(tl.float32)
            acc += rule_col[:, None, None] * u[None, :, :]
            if HAS_PARTIAL:
                share = tl.sum(tl.sum(x2 * u[None, :, :], axis=2), axis=1)              # [NB]
                program = pid_m * tl.num_programs(1) + pid_c
                tl.store(part_ptr + ((program * NPHM + i) * NPHM + b) * NB + offs_a, share)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_a[:, None, None] * P + offs_c[None, None, :],
                       mask=a_mask[:, None, None] & c_mask[None, None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_a[:, None, None] * stride_oa + m64[None, :, None] * stride_om
             + offs_c[None, None, :] * stride_oc, acc.to(out_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _phm_grad_factor_kernel(
    l_ptr, rule_ptr, r_ptr, out_ptr,
    M, NPHM, C, D, M_PART,
    stride_lm, stride_la, stride_li, stride_lc,
    stride_ri, stride_ra, stride_rb,
    stride_xm, stride_xb, stride_xi, stride_xd,
    stride_op, stride_oi, stride_oc, stride_od,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BF16_VIA_FP32: tl.constexpr,
):
    """out[p, i, c, d] = Σ_m Σ_b (Σ_a rule[i, a, b]·l[m, a, i, c])·r[m, b, i, d] over the tokens of
    part p, m in [p·M_PART, (p+1)·M_PART) ∩ [0, M) (M_PART a multiple of BLOCK_M); grid
    (parts·n, ⌈C/BC⌉, ⌈D/BD⌉), axis 0 = p·n + i. One part: out is the gradient itself (stride_op unused)."""
    i = tl.program_id(0) % NPHM
    part = tl.program_id(0) // NPHM
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_a = tl.arange(0, NB)
    c_mask = offs_c < C
    d_mask = offs_d < D
    a_mask = offs_a < NPHM
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    m_start = part * M_PART
    m_stop = tl.minimum(m_start + M_PART, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_stop
        m64 = offs_m.to(tl.int64)
        left = tl.load(l_ptr + offs_a[:, None, None] * stride_la + m64[None, :, None] * stride_lm + i * stride_li
                       + offs_c[None, None, :] * stride_lc,
                       mask=a_mask[:, None, None] & m_mask[None, :, None] & c_mask[None, None, :],
                       other=0.0).to(tl.float32)                                          # [NB, BM, BC]
        for b in range(0, NPHM):
            rule_col = tl.load(rule_ptr + i * stride_ri + offs_a * stride_ra + b * stride_rb,
                               mask=a_mask, other=0.0).to(tl.float32)
            mixed = tl.sum(rule_col[:, None, None] * left, axis=0)                       # [BM, BC]
            right = tl.load(r_ptr + m64[:, None] * stride_xm + b * stride_xb + i * stride_xi
                            + offs_d[None, :] * stride_xd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            acc = dot(tl.trans(mixed.to(r_ptr.dtype.element_ty)), right, acc, INPUT_PRECISION, BF16_VIA_FP32)
    tl.store(out_ptr + part * stride_op + i * stride_oi + offs_c[:, None] * stride_oc + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=c_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------- launch configuration

# NB -> (BLOCK_M, BLOCK_C, BLOCK_D): the mix kernel holds NB·BM·BC fp32 accumulators (twice that
# with the dA shares), so the tile shrinks as n grows. By design, not yet by measurement (no GPU
# run of this kernel yet).
_MIX_TILES = {2: (64, 64, 32), 4: (32, 64, 32), 8: (32, 32, 32), 16: (16, 32, 32)}
_FACTOR_TILES = {2: (32, 64, 64), 4: (32, 64, 64), 8: (32, 32, 64), 16: (16, 32, 64)}
_INTERPRET_TILES = (16, 16, 16)  # the CPU interpreter: small tiles keep tests fast and hit ragged edges
NB_CHOICES = tuple(_MIX_TILES)


def _nb(n: int) -> int:
    if n > MAX_PHM_DIM:
        raise ValueError(f"phm_linear (triton): phm_dim {n} > {MAX_PHM_DIM} is not supported by the Triton kernels; "
                         "use the torch or cpu face")
    return max(2, next_power_of_2(n))


def _mix(inp4, rule, w, bias, x2=None):
    """``out[m, a, c] = Σᵢ Σ_b rule[i, a, b]·inp4[m, b, i, :]·w[i, c, :]`` → ``[M, n, P]`` (and dA shares
    summed, ``[n, n, n]`` fp32, when x2 ``[M, n, P]`` is given). Views of any strides."""
    M, n, _, D = inp4.shape
    P = w.shape[1]
    bias = None if bias is None else bias.contiguous()  # indexed flat in the kernel
    out = torch.empty((M, n, P), device=inp4.device, dtype=inp4.dtype)
    if M == 0:
        return out, (torch.zeros((n, n, n), device=inp4.device, dtype=torch.float32) if x2 is not None else None)
    nb = _nb(n)
    block_m, block_c, block_d = _INTERPRET_TILES if triton_interpreting() else _MIX_TILES[nb]
    grid = (cdiv(M, block_m), cdiv(P, block_c))
    part = (torch.empty((grid[0] * grid[1], n, n, nb), device=inp4.device, dtype=torch.float32)
            if x2 is not None else out)
    x2_ = x2 if x2 is not None else out
    wrap_triton(_phm_mix_kernel)[grid](
        inp4, rule, w, out if bias is None else bias, out, x2_, part,
        M, n, P, D,
        *inp4.stride(), *rule.stride(), *w.stride(), *out.stride(), *x2_.stride(),
        HAS_BIAS=bias is not None, HAS_PARTIAL=x2 is not None, NB=nb,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        INPUT_PRECISION=input_precision(inp4.dtype), BF16_VIA_FP32=bf16_via_fp32(inp4.dtype), num_warps=4,
    )
    return out, (part.sum(0)[..., :n] if x2 is not None else None)


def factor_plan(M: int, n: int, C: int, D: int, sms: int) -> tuple[tuple[int, int, int], int, int, str | None]:
    """((BLOCK_M, BLOCK_C, BLOCK_D), parts, M_PART, why the grid stays below `sms` programs or None)
    of a factor gradient ``[n, C, D]`` reduced over M tokens: n·⌈C/BC⌉·⌈D/BD⌉ tiles, the tokens split
    into the fewest parts of whole BLOCK_M trips that bring the grid to `sms` (_common.wave_split).
    Compacter's rank-1 factors at 4096 tokens (n = 4: C or D = 1024 and 1, 64 tiles of 128 trips)
    take 4 parts of 32 trips on 132 SMs: 256 programs."""
    block_m, block_c, block_d = _INTERPRET_TILES if triton_interpreting() else _FACTOR_TILES[_nb(n)]
    tiles = n * cdiv(C, block_c) * cdiv(D, block_d)
    trips = max(1, cdiv(M, block_m))
    parts = wave_split(tiles, trips, sms)
    m_part = cdiv(trips, parts) * block_m
    parts = cdiv(trips, m_part // block_m)   # no empty part
    reason = None if tiles * parts >= sms else (
        f"{tiles} tile(s) of {block_c}x{block_d} over {n} terms, {M} token(s) in {trips} trip(s) of {block_m}: "
        f"{tiles * parts} programs, fewer than the {sms} SMs")
    return (block_m, block_c, block_d), parts, m_part, reason


def _grad_factor(l4, rule, r4):
    """``out[i, c, d] = Σ_m Σ_b (Σ_a rule[i, a, b]·l4[m, a, i, c])·r4[m, b, i, d]`` → ``[n, C, D]``.
    Below a wave of tiles the tokens are split (:func:`factor_plan`): each part's fp32 sums go to its
    own plane of ``[parts, n, C, D]``, added in a fixed order after (the same result every run)."""
    M, n, _, C = l4.shape
    D = r4.shape[3]
    if M == 0:
        return torch.zeros((n, C, D), device=l4.device, dtype=l4.dtype)
    nb = _nb(n)
    (block_m, block_c, block_d), parts, m_part, reason = factor_plan(M, n, C, D, sm_count(l4.device))
    out = torch.empty((n, C, D), device=l4.device, dtype=l4.dtype) if parts == 1 else \
        torch.empty((parts, n, C, D), device=l4.device, dtype=torch.float32)
    if reason:
        note_short_grid(reason)
    grid = (parts * n, cdiv(C, block_c), cdiv(D, block_d))
    wrap_triton(_phm_grad_factor_kernel)[grid](
        l4, rule, r4, out, M, n, C, D, m_part,
        *l4.stride(), *rule.stride(), *r4.stride(), out.stride(0) if parts > 1 else 0, *out.stride()[-3:],
        NB=nb, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        INPUT_PRECISION=input_precision(l4.dtype), BF16_VIA_FP32=bf16_via_fp32(l4.dtype), num_warps=4,
    )
    return out if parts == 1 else sum_parts(out, l4.dtype)


def _blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[M, n·w]`` → ``[M, n, n, w]`` view whose term axis i has stride 0 (the same x for every Aᵢ)."""
    M, width = t.shape
    return t.reshape(M, n, 1, width // n).expand(M, n, n, width // n)


def _shrink_right(x, phm_b_right):
    """``T[m, b, i, k] = x[m, b, :]·Tᵢ[k, :]``: one skinny GEMM, ``[M, n, n, r]``."""
    n, r, q = phm_b_right.shape
    return torch.mm(x.reshape(-1, q), phm_b_right.reshape(n * r, q).t()).view(x.shape[0], n, n, r)


# ---------------------------------------------------------------- the op's Triton face

def phm_linear_fwd(x: torch.Tensor, phm_rule: torch.Tensor, phm_b: torch.Tensor | None = None,
                   phm_b_left: torch.Tensor | None = None, phm_b_right: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton face of ``fastpeft::phm_linear_fwd`` (shapes and dtypes: fastpeft/ops/phm_linear.py)."""
    n = phm_rule.shape[0]
    if phm_b is not None:
        y, _ = _mix(_blocks(x, n), phm_rule, phm_b, bias)
    else:
        y, _ = _mix(_shrink_right(x, phm_b_right), phm_rule, phm_b_left, bias)
    return y.flatten(1)  # [M, N] (also when M = 0)


def phm_linear_bwd(grad_y: torch.Tensor, x: torch.Tensor, phm_rule: torch.Tensor, phm_b: torch.Tensor | None = None,
                   phm_b_left: torch.Tensor | None = None, phm_b_right: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton face of ``fastpeft::phm_linear_bwd``."""
    M, n = x.shape[0], phm_rule.shape[0]
    q = x.shape[1] // n
    rule_t = phm_rule.transpose(1, 2)
    dy4 = _blocks(grad_y, n)
    x4 = _blocks(x, n)
    # The unused gradients are empty tensors of their own: outputs of a torch.library op may not
    # alias each other (one `empty` returned twice fails its check on the GPU).
    if phm_b is not None:
        grad_x, grad_rule = _mix(dy4, rule_t, phm_b.transpose(1, 2), None, x2=x.reshape(M, n, q))
        grad_b = _grad_factor(dy4, phm_rule, x4)
        return grad_x.flatten(1), grad_rule.to(x.dtype), grad_b, x.new_empty(0), x.new_empty(0)
    n, p, r = phm_b_left.shape
    t = _shrink_right(x, phm_b_right)                                                        # [m, b, i, k]
    g = torch.mm(grad_y.reshape(M * n, p), phm_b_left.permute(1, 0, 2).reshape(p, n * r)).view(M, n, n, r)
    grad_x, _ = _mix(g, rule_t, phm_b_right.transpose(1, 2), None)
    grad_rule = torch.einsum("maik,mbik->iab", g, t)      # M·n³·r: small next to the rest
    grad_left = _grad_factor(dy4, phm_rule, t)
    grad_right = _grad_factor(g, phm_rule, x4)
    return grad_x.flatten(1), grad_rule, x.new_empty(0), grad_left, grad_right


# ---------------------------------------------------------------- ahead-of-time compile list

def aot_configs():
    """Yield (kernel, signature, constexprs, options) for every launch configuration above."""
    for tname, dtype in TRITON_DTYPES.items():
        ptr = f"*{tname}"
        for precision in (["ieee", "tf32"] if dtype == torch.float32 else ["tf32"]):
            for nb in NB_CHOICES:
                bm, bc, bd = _MIX_TILES[nb]
                for has_bias, has_partial in ((False, False), (True, False), (False, True)):
                    sig = {"inp_ptr": ptr, "rule_ptr": ptr, "w_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr,
                           "x2_ptr": ptr, "part_ptr": "*fp32" if has_partial else ptr,
                           "M": "i32", "NPHM": "i32", "P": "i32", "D": "i32",
                           **{f"stride_{s}": "i32" for s in ("im", "ib", "ii", "id", "ri", "ra", "rb", "wi", "wc",
                                                             "wd", "om", "oa", "oc", "xm", "xa", "xc")}}
                    yield _phm_mix_kernel, sig, dict(HAS_BIAS=has_bias, HAS_PARTIAL=has_partial, NB=nb, BLOCK_M=bm,
                                                     BLOCK_C=bc, BLOCK_D=bd, INPUT_PRECISION=precision,
                                                     BF16_VIA_FP32=False), dict(num_warps=4, num_stages=3)
                bm, bc, bd = _FACTOR_TILES[nb]
                for out in sorted({ptr, "*fp32"}):   # the gradient itself, or fp32 parts of a token split
                    sig = {"l_ptr": ptr, "rule_ptr": ptr, "r_ptr": ptr, "out_ptr": out,
                           "M": "i32", "NPHM": "i32", "C": "i32", "D": "i32", "M_PART": "i32",
                           **{f"stride_{s}": "i32" for s in ("lm", "la", "li", "lc", "ri", "ra", "rb", "xm", "xb",
                                                             "xi", "xd", "op", "oi", "oc", "od")}}
                    yield _phm_grad_factor_kernel, sig, dict(NB=nb, BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd,
                                                             INPUT_PRECISION=precision, BF16_VIA_FP32=False), \
                        dict(num_warps=4, num_stages=3)
