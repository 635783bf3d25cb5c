"""PHM (parameterised hypercomplex multiplication) linear: ``y = x·Wᵀ + bias`` with ``W = Σᵢ Aᵢ ⊗ Bᵢ``.

n = phm_dim terms; ``Aᵢ`` is n×n (the "rule", shared across layers in Compacter), ``Bᵢ`` is
``[out/n, in/n]``, either full or low-rank ``Bᵢ = Sᵢ·Tᵢ`` (Compacter++'s ``phm_rank`` r).
W is never formed outside the reference: ``(A ⊗ B)·vec(X) = vec(B·X·Aᵀ)``, so with x viewed as
``[M, n, in/n]`` (block b of x is ``x[:, b, :]``)

    y[m, a, :] = Σᵢ Σ_b Aᵢ[a, b] · Bᵢ · x[m, b, :]

and with ``Bᵢ = Sᵢ·Tᵢ`` the in/n-wide blocks shrink to r first, so a step costs about
``M·n·r·(in + out)`` multiply-adds instead of ``M·in·out``.

Faces (one op, one place):
  reference   this file: materialise ``W = Σᵢ torch.kron(Aᵢ, Bᵢ)`` and multiply (what every public
              implementation does on every forward)
  cpu         this file (``phm_linear_*_factored``): the factored computation with torch ops. Not
              C++: the work is two GEMMs plus n×n mixing of small blocks, which C++ would express
              with the very same ``at::mm``/``at::einsum`` calls (MKL does the GEMMs either way), so
              it is registered from Python as the op's CPU kernel.
  triton      ``fastpeft/kernels/phm_linear.py``: the Aᵢ mixing fused into the GEMMs' tiles

Ops (2-D inputs; the public :func:`phm_linear` flattens leading dimensions):

``phm_linear_fwd(x, phm_rule, phm_b, phm_b_left, phm_b_right, bias) -> y``
    x ``[M, in]``, phm_rule ``[n, n, n]`` (``phm_rule[i]`` is Aᵢ), and either phm_b ``[n, out/n, in/n]``
    (full Bᵢ) or phm_b_left ``[n, out/n, r]`` and phm_b_right ``[n, r, in/n]`` (``Bᵢ = left[i]·right[i]``);
    bias ``[out]`` or None. y ``[M, out]``.
``phm_linear_bwd(grad_y, x, phm_rule, phm_b, phm_b_left, phm_b_right) -> (grad_x, grad_rule, grad_b, grad_b_left, grad_b_right)``
    The gradients of the factors given; those of absent factors are empty tensors.

All tensors share one dtype (float32, float16 or bfloat16) and one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry


def _shape(t):
    return list(t.shape)


def phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right):
    """(M, n, in/n, out/n, r) of a checked call; r is 0 for full Bᵢ."""
    n = phm_rule.shape[0]
    if phm_b is not None:
        return x.shape[0], n, phm_b.shape[2], phm_b.shape[1], 0
    return x.shape[0], n, phm_b_right.shape[2], phm_b_left.shape[1], phm_b_left.shape[2]


def check_phm_linear_args(x, phm_rule, phm_b, phm_b_left, phm_b_right, bias=None, op="phm_linear"):
    """Validate a PHM linear call; raises TypeError/ValueError naming the problem."""
    _registry.check_tensors(op, (("x", x), ("phm_rule", phm_rule), ("phm_b", phm_b), ("phm_b_left", phm_b_left),
                                 ("phm_b_right", phm_b_right), ("bias", bias)),
                            optional=("phm_b", "phm_b_left", "phm_b_right", "bias"))
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [tokens, in_features] at the op level; got shape {_shape(x)}")
    _registry.check_rows_contiguous(op, ("x", x))
    if phm_rule.dim() != 3 or phm_rule.shape[0] < 1 or phm_rule.shape[1:] != (phm_rule.shape[0],) * 2:
        raise ValueError(f"{op}: phm_rule must be [n, n, n] (Aᵢ = phm_rule[i], n = phm_dim >= 1); got {_shape(phm_rule)}")
    n = phm_rule.shape[0]
    in_features = x.shape[1]
    if in_features % n:
        raise ValueError(f"{op}: in_features {in_features} is not divisible by phm_dim {n}")
    q = in_features // n
    if (phm_b is None) == (phm_b_left is None and phm_b_right is None):
        raise ValueError(f"{op}: give either phm_b (full Bᵢ) or phm_b_left and phm_b_right (low-rank Bᵢ), not both")
    if phm_b is not None:
        if phm_b.dim() != 3 or phm_b.shape[0] != n or phm_b.shape[2] != q or phm_b.shape[1] < 1:
            raise ValueError(f"{op}: phm_b must be [phm_dim, out_features/phm_dim, in_features/phm_dim] = "
                             f"[{n}, p, {q}]; got {_shape(phm_b)}")
        p = phm_b.shape[1]
    else:
        if phm_b_left is None or phm_b_right is None:
            raise ValueError(f"{op}: low-rank Bᵢ needs both phm_b_left and phm_b_right")
        if phm_b_left.dim() != 3 or phm_b_left.shape[0] != n or phm_b_left.shape[1] < 1 or phm_b_left.shape[2] < 1:
            raise ValueError(f"{op}: phm_b_left must be [phm_dim, out_features/phm_dim, phm_rank] = [{n}, p, r]; "
                             f"got {_shape(phm_b_left)}")
        p, r = phm_b_left.shape[1], phm_b_left.shape[2]
        if tuple(phm_b_right.shape) != (n, r, q):
            raise ValueError(f"{op}: phm_b_right must be [phm_dim, phm_rank, in_features/phm_dim] = [{n}, {r}, {q}]; "
                             f"got {_shape(phm_b_right)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n * p):
        raise ValueError(f"{op}: bias must be [out_features] = [{n * p}]; got {_shape(bias)}")


# ---------------------------------------------------------------- the reference: materialise W

def phm_dense_weight(phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None) -> torch.Tensor:
    """``W = Σᵢ kron(Aᵢ, Bᵢ)``, ``[out, in]`` (what the reference multiplies by, and merging uses)."""
    b = phm_b if phm_b is not None else torch.bmm(phm_b_left, phm_b_right)
    return sum(torch.kron(phm_rule[i], b[i]) for i in range(phm_rule.shape[0]))


def phm_linear_fwd_reference(x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None, bias=None):
    return F.linear(x, phm_dense_weight(phm_rule, phm_b, phm_b_left, phm_b_right), bias)


def phm_linear_bwd_reference(grad_y, x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None):
    """Through the dense gradient ``dW = dyᵀ·x``, folded back onto the factors:
    ``dAᵢ[a, b] = ⟨dW block (a, b), Bᵢ⟩`` and ``dBᵢ = Σ_ab Aᵢ[a, b]·(dW block (a, b))``."""
    _, n, q, p, _ = phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right)
    b = phm_b if phm_b is not None else torch.bmm(phm_b_left, phm_b_right)
    w = phm_dense_weight(phm_rule, phm_b, phm_b_left, phm_b_right)
    grad_x = grad_y @ w
    grad_w = (grad_y.t() @ x).view(n, p, n, q)                    # [a, c, b, d]
    grad_rule = torch.einsum("acbd,icd->iab", grad_w, b)
    grad_b_full = torch.einsum("iab,acbd->icd", phm_rule, grad_w)
    if phm_b is not None:
        return grad_x, grad_rule, grad_b_full, x.new_empty(0), x.new_empty(0)
    return (grad_x, grad_rule, x.new_empty(0), torch.bmm(grad_b_full, phm_b_right.transpose(1, 2)),
            torch.bmm(phm_b_left.transpose(1, 2), grad_b_full))


# ---------------------------------------------------------------- the factored computation (CPU face)
#
# Index names: m token, a/b block of y/x (n of them), i term, c in 0..out/n, d in 0..in/n, k in 0..r.
# Full Bᵢ:  Z[m,a,i,d] = Σ_b Aᵢ[a,b]·x[m,b,d] (cheap: n² per element of x), then one GEMM
#           y[(m,a), c] = Z[(m,a), (i,d)] · Bcat[c, (i,d)]ᵀ with Bcat[c, (i,d)] = Bᵢ[c,d].
# Low rank: T[m,b,i,k] = x[m,b,:]·Tᵢ[k,:]ᵀ (GEMM to width n·r), H = Aᵢ-mix of T, y = H · Scatᵀ.

def _b_cat(phm_b):
    """Bcat[c, (i, d)] = Bᵢ[c, d]: ``[out/n, n·in/n]``."""
    n, p, q = phm_b.shape
    return phm_b.permute(1, 0, 2).reshape(p, n * q)


def phm_linear_fwd_factored(x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None, bias=None):
    M, n, q, p, r = phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right)
    x3 = x.view(M, n, q)
    if phm_b is not None:
        z = torch.einsum("iab,mbd->maid", phm_rule, x3).reshape(M * n, n * q)
        y = z @ _b_cat(phm_b).t()
    else:
        t = (x3.reshape(M * n, q) @ phm_b_right.reshape(n * r, q).t()).view(M, n, n, r)   # [m, b, i, k]
        h = torch.einsum("iab,mbik->maik", phm_rule, t).reshape(M * n, n * r)
        y = h @ _b_cat(phm_b_left).t()
    y = y.view(M, n * p)
    return y if bias is None else y.add_(bias)


def phm_linear_bwd_factored(grad_y, x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None):
    M, n, q, p, r = phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right)
    x3 = x.view(M, n, q)
    dy = grad_y.reshape(M * n, p)                                                  # rows (m, a)
    if phm_b is not None:
        pm = (dy @ _b_cat(phm_b)).view(M, n, n, q)                                 # P[m,a,i,d] = dy[m,a,:]·Bᵢ
        grad_x = torch.einsum("iab,maid->mbd", phm_rule, pm).reshape(M, n * q)
        grad_rule = torch.einsum("maid,mbd->iab", pm, x3)
        z = torch.einsum("iab,mbd->maid", phm_rule, x3).reshape(M * n, n * q)
        grad_b = (dy.t() @ z).view(p, n, q).permute(1, 0, 2).contiguous()
        return grad_x, grad_rule, grad_b, x.new_empty(0), x.new_empty(0)
    t = (x3.reshape(M * n, q) @ phm_b_right.reshape(n * r, q).t()).view(M, n, n, r)       # [m, b, i, k]
    h = torch.einsum("iab,mbik->maik", phm_rule, t).reshape(M * n, n * r)
    g = (dy @ _b_cat(phm_b_left)).view(M, n, n, r)                                          # [m, a, i, k]
    g_mixed = torch.einsum("iab,maik->mbik", phm_rule, g).reshape(M * n, n * r)
    grad_x = (g_mixed @ phm_b_right.reshape(n * r, q)).view(M, n * q)
    grad_rule = torch.einsum("maik,mbik->iab", g, t)
    grad_left = (dy.t() @ h).view(p, n, r).permute(1, 0, 2).contiguous()
    grad_right = (g_mixed.t() @ x3.reshape(M * n, q)).view(n, r, q)
    return grad_x, grad_rule, x.new_empty(0), grad_left, grad_right


# ---------------------------------------------------------------- the registered ops

def _check_fwd(x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None, bias=None):
    check_phm_linear_args(x, phm_rule, phm_b, phm_b_left, phm_b_right, bias, op="phm_linear_fwd")


def _fake_fwd(x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None, bias=None):
    _, n, _, p, _ = phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right)
    return x.new_empty(x.shape[0], n * p)


def _check_bwd(grad_y, x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None):
    op = "phm_linear_bwd"
    check_phm_linear_args(x, phm_rule, phm_b, phm_b_left, phm_b_right, None, op=op)
    _registry.check_tensors(op, (("x", x), ("grad_y", grad_y)))
    M, n, _, p, _ = phm_dims(x, phm_rule, phm_b, phm_b_left, phm_b_right)
    if tuple(grad_y.shape) != (M, n * p):
        raise ValueError(f"{op}: grad_y must be [{M}, {n * p}]; got {_shape(grad_y)}")
    _registry.check_rows_contiguous(op, ("grad_y", grad_y))


def _fake_bwd(grad_y, x, phm_rule, phm_b=None, phm_b_left=None, phm_b_right=None):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)
    return torch.empty_like(x), torch.empty_like(phm_rule), like(phm_b), like(phm_b_left), like(phm_b_right)


def _choose_cuda(device, x, phm_rule, *args):
    # the Triton kernels keep n-wide tiles in registers: n <= 16
    return ("triton", "torch") if phm_rule.shape[0] <= 16 else ("torch",)


def _choose_cpu(device, x, phm_rule, phm_b=None, *args):
    if phm_b is not None:
        # Full Bᵢ: the factored step has the dense layer's M·in·out FLOPs plus n-times-wider
        # intermediates, while forming W costs only n·in·out; measured on 2 cores (M=512,
        # in=out=1024/2048, n=4/8) the factored fwd+bwd took 1.04-1.28x the reference's time.
        return ("torch", "cpu")
    return None


def _for_backward(rule):
    """The forward's rule for the backward op, whose arguments are grad_y and then the forward's."""
    return lambda device, grad_y, x, *factors: rule(device, x, *factors)



def _setup_fwd(ctx, inputs, output):
    x, phm_rule, phm_b, phm_b_left, phm_b_right, _ = inputs
    ctx.save_for_backward(x, phm_rule, phm_b, phm_b_left, phm_b_right)


def _backward_fwd(ctx, grad_y):
    """Through the backward op: gradients for x, the rule Aᵢ, Bᵢ (or its two factors) and bias. A
    rule shared by several layers is one leaf, so autograd sums its gradients across them."""
    x, phm_rule, phm_b, phm_b_left, phm_b_right = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x, grad_rule, grad_b, grad_left, grad_right = phm_linear_bwd(grad_y, x, phm_rule, phm_b, phm_b_left,
                                                                      phm_b_right)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_rule if need[1] else None,
            grad_b if need[2] and phm_b is not None else None,
            grad_left if need[3] and phm_b_left is not None else None,
            grad_right if need[4] and phm_b_right is not None else None,
            grad_y.sum(0) if need[5] else None)


phm_linear_fwd = _registry.define(
    "phm_linear_fwd",
    "(Tensor x, Tensor phm_rule, Tensor? phm_b=None, Tensor? phm_b_left=None, Tensor? phm_b_right=None,"
    " Tensor? bias=None) -> Tensor",
    check=_check_fwd, fake=_fake_fwd, reference=phm_linear_fwd_reference,
    choose={"cuda": _choose_cuda, "cpu": _choose_cpu}, triton="phm_linear",
    cpu_kernel=phm_linear_fwd_factored, setup_context=_setup_fwd, backward=_backward_fwd)

phm_linear_bwd = _registry.define(
    "phm_linear_bwd",
    "(Tensor grad_y, Tensor x, Tensor phm_rule, Tensor? phm_b=None, Tensor? phm_b_left=None,"
    " Tensor? phm_b_right=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    check=_check_bwd, fake=_fake_bwd, reference=phm_linear_bwd_reference,
    choose={"cuda": _for_backward(_choose_cuda), "cpu": _for_backward(_choose_cpu)}, triton="phm_linear",
    cpu_kernel=phm_linear_bwd_factored)


# ---------------------------------------------------------------- public entry

def phm_linear(x: torch.Tensor, phm_rule: torch.Tensor, phm_b: torch.Tensor | None = None,
               phm_b_left: torch.Tensor | None = None, phm_b_right: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x·(Σᵢ Aᵢ ⊗ Bᵢ)ᵀ + bias`` on the fastest face available, with autograd; W is never formed.

    Args:
        x: ``[..., in_features]``, contiguous in its last dimension; float32, float16 or bfloat16.
        phm_rule: ``[n, n, n]``, ``phm_rule[i]`` = Aᵢ; in_features and out_features divisible by n.
        phm_b: ``[n, out/n, in/n]`` full Bᵢ; or instead
        phm_b_left, phm_b_right: ``[n, out/n, r]`` and ``[n, r, in/n]``, ``Bᵢ = left[i]·right[i]``.
        bias: ``[out_features]`` or None.
    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    if not torch.compiler.is_compiling():
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError("phm_linear: x must be a Tensor with at least one dimension")
        _registry.check_rows_contiguous("phm_linear", ("x", x))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = phm_linear_fwd(x2, phm_rule, phm_b, phm_b_left, phm_b_right, bias)  # autograd: the op's derivative
    return y.reshape(*lead, y.shape[-1])


__all__ = ["phm_linear", "phm_linear_fwd", "phm_linear_bwd", "phm_linear_fwd_reference", "phm_linear_bwd_reference",
           "phm_linear_fwd_factored", "phm_linear_bwd_factored", "phm_dense_weight", "check_phm_linear_args"]
