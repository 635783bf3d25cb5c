"""Every op's derivative, declared once where the op is and registered by the registry: opcheck
passes with inputs that require grad, ``torch.ops.fastpeft.*`` called directly trains (gradients
equal to those of the Python API, and to autograd through the reference), the Op object keeps
its face under autograd, and differentiating twice is refused."""

import pytest
import torch

import fastpeft
from fastpeft.nn import Linear4bit, MultiLoRALinear, use_adapter_batch
from fastpeft.ops import (AdapterBatch, adapter_block, all_ops, dora_linear, lora_linear, phm_linear, record_faces)
from fastpeft.ops.dora_linear import row_norms_sq
from fastpeft.ops.nf4_matmul import nf4_linear, qlora_linear, weight_args

from adapter_stacks import S, stacks
from conftest import assert_close, face_params, on_face

# The ops that compute a layer's forward: each must declare its derivative. (Ops that compute
# gradients, *_bwd and sgmv_outer, are differentiated by the op that calls them.)
FORWARD_OPS = ("dense_linear", "lora_linear_fwd", "dora_linear_fwd", "phm_linear_fwd", "adapter_block_fwd",
               "nf4_matmul", "bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand")

IDS = [0, 1, -1, 5, 5, 2, 2, 2, -1, 3, 4, 0, 3]  # 13 tokens, every slot, two base-model rows


def _g(*shape, generator):
    return torch.randn(*shape, generator=generator).requires_grad_()


def _lora(with_x_lora, g):
    x, w, b, a, bb = _g(9, 23, generator=g), _g(19, 23, generator=g), _g(19, generator=g), _g(3, 23, generator=g), \
        _g(19, 3, generator=g)
    keep = torch.rand(x.shape, generator=g) >= 0.5  # dropout's mask, drawn from the case's generator
    x_lora = (x.detach() * keep * 2).requires_grad_() if with_x_lora else None
    return (x, w, b, a, bb, 0.7, x_lora)


def _dora(with_x_lora, g):
    """DoRA's inputs on _lora's, plus a magnitude near the row norms and the cached ‖Wᵢ‖² (a
    constant of the frozen base: never differentiable, so it does not require grad)."""
    x, w, b, a, bb, scaling, x_lora = _lora(with_x_lora, g)
    norm = (w.detach() + scaling * bb.detach() @ a.detach()).norm(dim=1)
    magnitude = (norm * (0.5 + torch.rand(norm.shape, generator=g))).requires_grad_()
    return (x, w, b, a, bb, magnitude, row_norms_sq(w.detach()), scaling, x_lora)


def _phm(low_rank, g):
    n, q, p = 4, 3, 2
    rule = _g(n, n, n, generator=g)
    factors = (None, _g(n, p, 2, generator=g), _g(n, 2, q, generator=g)) if low_rank else (_g(n, p, q, generator=g),
                                                                                            None, None)
    return (_g(7, n * q, generator=g), rule, *factors, _g(n * p, generator=g))


def _adapter_block(activation, g):
    return (_g(7, 13, generator=g), _g(7, 11, generator=g), _g(5, 13, generator=g), _g(5, generator=g),
            _g(11, 5, generator=g), _g(11, generator=g), 0.6, activation)


def _nf4(transposed, double_quant, g):
    N, K, r = 24, 40, 3  # 960 weights: 15 blocks of 64
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / K ** 0.5)
    q = Linear4bit.from_linear(lin, 64, double_quant).q
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    rows, cols = (N, K) if transposed else (K, N)
    bias = None if transposed else _g(N, generator=g)
    return (_g(5, rows, generator=g), packed, absmax, quant_map, blocksize, N, bias, transposed, _g(5, r, generator=g),
            _g(r, cols, generator=g), 0.8, nested_absmax, nested_quant_map, offset)


def _stacks(g):
    a, b, scalings = stacks(20, 12, 8, torch.float32, "cpu")
    return a.requires_grad_(), b.requires_grad_(), scalings.requires_grad_()


def _bgmv_shrink(g):
    a, _, _ = _stacks(g)
    return (_g(len(IDS), 20, generator=g), a, torch.tensor(IDS, dtype=torch.int32))


def _bgmv_expand(g):
    _, b, scalings = _stacks(g)
    return (_g(len(IDS), 12, generator=g), _g(len(IDS), 8, generator=g), b, scalings, torch.tensor(IDS, dtype=torch.int32))


def _routing():
    return AdapterBatch.build(torch.tensor(IDS), S).routing


def _sgmv_shrink(g):
    a, _, _ = _stacks(g)
    return (_g(len(IDS), 20, generator=g), a, *_routing())


def _sgmv_expand(g):
    _, b, scalings = _stacks(g)
    return (_g(len(IDS), 12, generator=g), _g(len(IDS), 8, generator=g), b, scalings, *_routing())


# op name -> {case id: builder(generator) -> args}; fp32, ragged shapes, differentiable inputs requiring grad
CASES = {
    "dense_linear": {"bias": lambda g: (_g(3, 23, generator=g), _g(19, 23, generator=g), _g(19, generator=g)),
                     "no_bias": lambda g: (_g(5, 23, generator=g), _g(19, 23, generator=g), None)},
    "lora_linear_fwd": {"x": lambda g: _lora(False, g), "x_lora": lambda g: _lora(True, g)},
    "dora_linear_fwd": {"x": lambda g: _dora(False, g), "x_lora": lambda g: _dora(True, g)},
    "phm_linear_fwd": {"full": lambda g: _phm(False, g), "low_rank": lambda g: _phm(True, g)},
    "adapter_block_fwd": {"gelu": lambda g: _adapter_block("gelu", g), "silu": lambda g: _adapter_block("silu", g)},
    "nf4_matmul": {"forward": lambda g: _nf4(False, False, g), "transposed": lambda g: _nf4(True, False, g),
                   "double_quant": lambda g: _nf4(False, True, g)},
    "bgmv_shrink": {"mixed": _bgmv_shrink},
    "bgmv_expand": {"mixed": _bgmv_expand},
    "sgmv_shrink": {"mixed": _sgmv_shrink},
    "sgmv_expand": {"mixed": _sgmv_expand},
}
CASE_PARAMS = [pytest.param(name, case, id=f"{name}-{case}") for name, cases in CASES.items() for case in cases]


def build(name, case, seed=0):
    return CASES[name][case](torch.Generator().manual_seed(seed))


def outputs(out):
    return out if isinstance(out, tuple) else (out,)


def differentiable(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def grads_of(fn, args, seed=1, used=None):
    """Gradients of a fixed random weighting of the outputs (those that require grad, or those
    given by index) w.r.t. the inputs that require grad."""
    outs = outputs(fn(*args))
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]  # CPU generator: same draws on any device
    used = used or [i for i, o in enumerate(outs) if o.requires_grad]
    loss = sum((outs[i] * weights[i]).sum() for i in used)
    return torch.autograd.grad(loss, differentiable(args), allow_unused=True)


def differentiable_outputs(fn, args):
    return [i for i, o in enumerate(outputs(fn(*args))) if o.requires_grad]


def test_every_forward_op_declares_its_derivative_and_every_derivative_has_a_case():
    ops = all_ops()
    missing = [name for name in FORWARD_OPS if ops[name].function is None]
    assert not missing, f"no derivative declared: {missing}"
    assert set(CASES) >= {name for name in FORWARD_OPS}
    uncovered = [name for name, op in ops.items() if op.function is not None and name not in CASES]
    assert not uncovered, f"ops with a derivative but no opcheck case here: {uncovered}"


@pytest.mark.parametrize("name,case", CASE_PARAMS)
def test_opcheck_with_inputs_that_require_grad(name, case):
    """The checks that failed for the forward ops before their autograd was registered
    (test_autograd_registration, test_aot_dispatch_dynamic) among all of opcheck's."""
    args = build(name, case)
    assert differentiable(args)
    torch.library.opcheck(getattr(torch.ops.fastpeft, name).default, args)


@pytest.mark.parametrize("name,case", CASE_PARAMS)
def test_direct_op_call_trains_as_autograd_through_the_reference(name, case):
    """torch.ops.fastpeft.<op> (the dispatcher's kernel, the registered derivative) and the Op
    object (a chosen face, the same derivative) give autograd-through-the-reference's gradients,
    every differentiable output weighted."""
    op = all_ops()[name]
    direct = getattr(torch.ops.fastpeft, name).default
    used = differentiable_outputs(direct, build(name, case))
    assert used and used == differentiable_outputs(op, build(name, case))
    expected = grads_of(op.reference, build(name, case), used=used)
    for fn in (direct, op):
        got = grads_of(fn, build(name, case))
        assert len(got) == len(expected)
        for i, (gt, ex) in enumerate(zip(got, expected)):
            assert gt is not None, f"{name}: no gradient for differentiable input {i}"
            assert_close(gt, ex, msg=f"{name} ({fn}): gradient {i}")


def test_lora_linear_fwd_s_is_saved_for_the_backward_not_differentiated():
    """As aten's saved outputs (layer norm's mean and rstd...): s = x_lora·Aᵀ does not require grad."""
    args = build("lora_linear_fwd", "x")
    for fn in (torch.ops.fastpeft.lora_linear_fwd.default, all_ops()["lora_linear_fwd"]):
        y, s = fn(*args)
        assert y.requires_grad and not s.requires_grad


def test_dora_linear_fwd_saved_outputs_and_norm_are_not_differentiated():
    """s, z and the row norm are kept for the backward; the norm is a constant (PEFT's detach), so
    none of them requires grad, and the norm equals the reference's on the same inputs."""
    args = build("dora_linear_fwd", "x")
    expected_norm = all_ops()["dora_linear_fwd"].reference(*args)[3]
    for fn in (torch.ops.fastpeft.dora_linear_fwd.default, all_ops()["dora_linear_fwd"]):
        y, s, z, norm = fn(*args)
        assert y.requires_grad and not (s.requires_grad or z.requires_grad or norm.requires_grad)
        assert_close(norm, expected_norm)


@pytest.mark.parametrize("name,case", [p for p in CASE_PARAMS
                                       if p.values[0] in ("lora_linear_fwd", "dora_linear_fwd", "bgmv_shrink")])
@pytest.mark.parametrize("device,backend", face_params())
def test_op_object_keeps_its_face_under_autograd(name, case, device, backend):
    """Called with inputs that require grad, the Op runs the forced face forward and its backward
    ops on the same face, and the gradients are the reference's."""
    op = all_ops()[name]
    if backend not in op.faces(device) or backend == "cuda" and name.startswith("bgmv"):
        pytest.skip(f"{name}'s derivative has no {backend} face throughout (sgmv_outer has no CUDA source)")
    expected = grads_of(op.reference, build(name, case), used=[0])
    args = [a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in build(name, case)]
    with on_face(backend) as taken:
        got = grads_of(op, args)
    names = {n for n, _ in taken}
    assert name in names and len(names) > 1, taken  # the forward and the ops of its backward
    for gt, ex in zip(got, expected):
        assert_close(gt.cpu(), ex)


def test_direct_calls_train_as_the_python_api_does():
    """Each layer's Python entry (its own fusion, where it has one) and the dispatcher's op called
    directly give the same gradients."""
    g = torch.Generator().manual_seed(0)
    # LoRA
    x, w, b, a, bb, scaling, _ = _lora(False, g)
    dy = torch.randn(9, 19, generator=g)
    api = torch.autograd.grad((lora_linear(x, w, b, a, bb, scaling) * dy).sum(), (x, w, b, a, bb))
    direct = torch.autograd.grad((torch.ops.fastpeft.lora_linear_fwd(x, w, b, a, bb, scaling)[0] * dy).sum(),
                                 (x, w, b, a, bb))
    for got, want in zip(direct, api):
        assert_close(got, want)
    # DoRA, with its norm cache passed and (the Python API's default) computed
    for with_x_lora in (False, True):
        x, w, b, a, bb, m, wsq, scaling, x_lora = _dora(with_x_lora, g)
        dy = torch.randn(9, 19, generator=g)
        leaves = (x, w, b, a, bb, m)
        if x_lora is None:
            api = torch.autograd.grad((dora_linear(x, w, b, a, bb, m, scaling) * dy).sum(), leaves)
        else:  # the API draws its own dropout mask: compare with the same seed through both
            torch.manual_seed(3)
            api = torch.autograd.grad((dora_linear(x, w, b, a, bb, m, scaling, wsq, dropout_p=0.5) * dy).sum(),
                                      leaves)
            torch.manual_seed(3)
            x_lora = torch.nn.functional.dropout(x, 0.5, training=True)
        y = torch.ops.fastpeft.dora_linear_fwd(x, w, b, a, bb, m, wsq, scaling, x_lora)[0]
        direct = torch.autograd.grad((y * dy).sum(), leaves)
        for got, want in zip(direct, api):
            assert_close(got, want)
    # PHM and the adapter block
    args = _phm(True, g)
    dy = torch.randn(7, 8, generator=g)
    api = torch.autograd.grad((phm_linear(*args) * dy).sum(), differentiable(args))
    direct = torch.autograd.grad((torch.ops.fastpeft.phm_linear_fwd(*args) * dy).sum(), differentiable(args))
    for got, want in zip(direct, api):
        assert_close(got, want)
    args = _adapter_block("gelu", g)
    dy = torch.randn(7, 11, generator=g)
    api = torch.autograd.grad((adapter_block(*args) * dy).sum(), differentiable(args))
    direct = torch.autograd.grad((torch.ops.fastpeft.adapter_block_fwd(*args) * dy).sum(), differentiable(args))
    for got, want in zip(direct, api):
        assert_close(got, want)


def test_nf4_matmul_called_directly_trains_as_qlora_does():
    """QLoRA's layer function (the LoRA dx fused into the 4-bit GEMM) and nf4_matmul called
    directly with the LoRA term as lora_s = x·Aᵀ, lora_l = Bᵀ: the same gradients."""
    g = torch.Generator().manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(40, 24), 64, True).q
    x, bias, a, b = _g(6, 40, generator=g), _g(24, generator=g), _g(3, 40, generator=g), _g(24, 3, generator=g)
    dy = torch.randn(6, 24, generator=g)
    api = torch.autograd.grad((qlora_linear(x, q, bias, a, b, 0.5) * dy).sum(), (x, bias, a, b))
    packed, absmax, quant_map, blocksize, nested_absmax, nested_quant_map, offset = weight_args(q)
    y = torch.ops.fastpeft.nf4_matmul(x, packed, absmax, quant_map, blocksize, 24, bias, False, x @ a.t(), b.t(), 0.5,
                                      nested_absmax, nested_quant_map, offset)
    direct = torch.autograd.grad((y * dy).sum(), (x, bias, a, b))
    for got, want in zip(direct, api):
        assert_close(got, want)
    api = torch.autograd.grad((nf4_linear(x, q, bias) * dy).sum(), (x, bias))
    direct = torch.autograd.grad((torch.ops.fastpeft.nf4_matmul(
        x, packed, absmax, quant_map, blocksize, 24, bias, False, None, None, 1.0, nested_absmax, nested_quant_map,
        offset) * dy).sum(), (x, bias))
    for got, want in zip(direct, api):
        assert_close(got, want)


def test_nf4_quantisation_state_is_refused_as_a_differentiable_input():
    args = list(_nf4(False, False, torch.Generator().manual_seed(0)))
    args[2] = args[2].clone().requires_grad_()  # absmax (float32 without double quantisation)
    y = torch.ops.fastpeft.nf4_matmul(*args)
    with pytest.raises(RuntimeError, match="nf4_matmul: absmax is the quantised weight's state and has no gradient"):
        y.sum().backward()


@pytest.mark.parametrize("T", [6, 40])  # BGMV and SGMV in the layer
def test_chained_ops_train_as_multi_lora_linear_does(T):
    """MultiLoRALinear's fused backward and the shrink and expand ops called directly, chained,
    with their own derivatives: the same gradients for x, both stacks, and (the ops only) the
    scalings against autograd through the per-row reference."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(20, 12), S, 8)
    a, b, scalings = stacks(20, 12, 8, torch.float32, "cpu")
    for slot in range(S):
        layer.set_adapter(slot, a[slot], b[slot], float(scalings[slot]))
    layer.lora_a.requires_grad_(True)
    layer.lora_b.requires_grad_(True)
    ids = torch.tensor((IDS * 4)[:T])
    x = torch.randn(T, 20, requires_grad=True)
    dy = torch.randn(T, 12)
    batch = AdapterBatch.build(ids, S, layer.loaded)
    with use_adapter_batch(batch):
        (layer(x) * dy).sum().backward()
    api = (x.grad, layer.lora_a.grad, layer.lora_b.grad)

    xs, sa, sb, sc = (t.detach().clone().requires_grad_() for t in (x, layer.lora_a, layer.lora_b, layer.scalings))
    base = layer.base_layer(xs)
    if batch.prefers_segments():
        out = torch.ops.fastpeft.sgmv_expand(base, torch.ops.fastpeft.sgmv_shrink(xs, sa, *batch.routing), sb, sc,
                                             *batch.routing)
    else:
        out = torch.ops.fastpeft.bgmv_expand(base, torch.ops.fastpeft.bgmv_shrink(xs, sa, batch.adapter_ids), sb, sc,
                                             batch.adapter_ids)
    (out * dy).sum().backward()
    for got, want in zip((xs.grad, sa.grad, sb.grad), api):
        assert_close(got, want)

    from fastpeft.ops.bgmv import bgmv_expand_reference, bgmv_shrink_reference
    xr, ar, br, cr = (t.detach().clone().requires_grad_() for t in (x, layer.lora_a, layer.lora_b, layer.scalings))
    ref = bgmv_expand_reference(layer.base_layer(xr), bgmv_shrink_reference(xr, ar, batch.adapter_ids), br, cr,
                                batch.adapter_ids)
    (ref * dy).sum().backward()
    for got, want in zip((xs.grad, sa.grad, sb.grad, sc.grad), (xr.grad, ar.grad, br.grad, cr.grad)):
        assert_close(got, want)


def test_differentiating_twice_is_refused():
    """Derivatives are once differentiable: a second derivative through an op raises where it
    would otherwise come out silently without the op's part."""
    x, w, b, a, bb, scaling, _ = _lora(False, torch.Generator().manual_seed(0))
    (gx,) = torch.autograd.grad(lora_linear(x, w, b, a, bb, scaling).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        gx.square().sum().backward()


def test_inference_builds_no_autograd_node_and_training_one_node():
    """The Op decides: no input needing grad (or no_grad) runs the face alone; otherwise one node
    of the op's derivative. Face recording sees the forward once either way."""
    x, w, b, a, bb, scaling, _ = _lora(False, torch.Generator().manual_seed(0))
    frozen = [t.detach() for t in (x, w, b, a, bb)]
    assert lora_linear(*frozen, scaling).grad_fn is None
    with torch.no_grad():
        assert lora_linear(x, w, b, a, bb, scaling).grad_fn is None
    with record_faces() as taken:
        y = lora_linear(x, w, b, a, bb, scaling)
    node = y.grad_fn.next_functions[0][0]  # under the reshape back to x's leading dimensions
    assert type(node).__name__ == "lora_linear_fwd_functionBackward", type(node).__name__
    assert [name for name, _ in taken] == ["lora_linear_fwd"]


def test_a_derivative_is_declared_whole():
    from fastpeft.ops import _registry
    with pytest.raises(ValueError, match="declared with both setup_context and backward"):
        _registry.define("half_declared", "(Tensor x) -> Tensor", check=lambda x: None, fake=lambda x: x,
                         reference=lambda x: x, backward=lambda ctx, g: g)
    assert "half_declared" not in all_ops()


@pytest.mark.skipif(not fastpeft.backends.availability("triton", torch.device("cpu")).usable,
                    reason="triton is not usable here")
def test_the_triton_op_has_the_same_derivative():
    """fastpeft::<op>_triton (what torch.compile sees of a Triton face) trains as the op does."""
    args = build("lora_linear_fwd", "x")
    expected = grads_of(all_ops()["lora_linear_fwd"].reference, args, used=[0])
    got = grads_of(torch.ops.fastpeft.lora_linear_fwd_triton.default, build("lora_linear_fwd", "x"))
    for gt, ex in zip(got, expected):
        assert_close(gt, ex)


@pytest.mark.skipif(not fastpeft.backends.availability("cpu", torch.device("cpu")).usable,
                    reason="the C++ CPU face is not usable here")
def test_a_face_runs_below_autograd_and_the_thread_state_is_restored(monkeypatch):
    """The registry excludes the autograd keys around a face's kernel (the registered autograd
    kernel would run again for nothing); the thread's exclusions are as they were after the call,
    after a kernel that raised, and inside torch's own below-autograd guard."""
    state = lambda: repr(torch._C._dispatch_tls_local_exclude_set())  # noqa: E731
    before = state()
    x, w, b, a, bb, scaling, _ = _lora(False, torch.Generator().manual_seed(0))
    op = all_ops()["lora_linear_fwd"]
    seen = []

    def kernel(*args):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradCPU))
        if len(seen) == 2:
            raise RuntimeError("kernel failed")
        return op.reference(*args)

    monkeypatch.setattr(op, "_overload", kernel)
    with torch.no_grad(), fastpeft.use_backend("cpu"):
        lora_linear(x, w, b, a, bb, scaling)
        assert state() == before
        with pytest.raises(RuntimeError, match="kernel failed"):
            lora_linear(x, w, b, a, bb, scaling)
        assert state() == before
        with torch._C._AutoDispatchBelowAutograd():
            inside = state()
            lora_linear(x, w, b, a, bb, scaling)
            assert state() == inside
    assert seen == [True, True, True] and state() == before
