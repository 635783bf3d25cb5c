"""Op plans: a layer's inference call on weights checked once (fastpeft.ops' Plan, held by
Linear4bit and LoRALinear). What runs on a plan equals the formula on the layer's current tensors,
whatever changed since the plan was made; bad input gets the op's errors; the checks run once."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.nn import Linear4bit, LoRALinear, op_plans
from fastpeft.nn.lora import DoRAMagnitude
from fastpeft.ops import record_faces
from fastpeft.ops.lora_linear import lora_linear_fwd
from fastpeft.ops.nf4_matmul import nf4_matmul
from fastpeft.quant.nf4 import dequantize_nf4, quantize_nf4

from conftest import assert_close

K, N, R = 48, 40, 6
DTYPES_PLANNED = [torch.float32, torch.bfloat16]


def lora_layer(dtype=torch.float32, bias=True):
    return LoRALinear.from_linear(nn.Linear(K, N, bias=bias).to(dtype), r=R, lora_alpha=2 * R,
                                  init_lora_weights=False).eval()


def nf4_layer(dtype=torch.float32):
    return Linear4bit.from_linear(nn.Linear(K, N).to(dtype), blocksize=64).eval()


def lora_formula(layer, x):
    """x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ in float64 from the layer's tensors as they are now."""
    name = layer.active_adapter
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias
    a, bb = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    xd = x.double()
    y = xd @ w.T + layer.scaling[name] * (xd @ a.T) @ bb.T
    return y if b is None else y + b.double()


def nf4_formula(layer, x):
    y = x.double() @ layer.dequantized_weight().double().T
    return y if layer.bias is None else y + layer.bias.double()


def held_plan(layer):
    held = layer.__dict__.get(op_plans.PLAN_ATTRIBUTE)
    return None if held is None else held.plan


@pytest.fixture(autouse=True, params=["cpp", "python"])
def held_call(request, monkeypatch):
    """Every test runs twice: the layers' held calls in C++ (fastpeft._C.HeldCall) and in Python
    (op_plans.PyHeldCall, what runs without the extension), over the same terms."""
    if request.param == "cpp":
        if getattr(fastpeft.backends.extension(), "HeldCall", None) is None:
            pytest.skip(f"not built here: {fastpeft.backends.extension_error()}")
    else:
        monkeypatch.setattr(op_plans, "held_call_class", lambda: op_plans.PyHeldCall)
    return request.param


def held_call_type(layer) -> type:
    """The class of the object whose call the layer's held plan runs."""
    return type(layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__)


@pytest.fixture
def check_calls(monkeypatch):
    """Counts the checker calls of both planned ops: {op name: calls}."""
    calls = {}
    for op in (lora_linear_fwd, nf4_matmul):
        def counting(*args, _op=op, _check=op.check):
            calls[_op.name] = calls.get(_op.name, 0) + 1
            return _check(*args)
        monkeypatch.setattr(op, "check", counting)
    return calls


# ---------------------------------------------------------------- the plan runs, once checked

@pytest.mark.parametrize("dtype", DTYPES_PLANNED, ids=str)
@pytest.mark.parametrize("kind", ["lora", "nf4"])
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_inference_runs_on_a_plan_checked_once_and_equals_the_formula(dtype, kind, grad_off, check_calls, held_call):
    layer = lora_layer(dtype) if kind == "lora" else nf4_layer(dtype)
    formula = lora_formula if kind == "lora" else nf4_formula
    op = lora_linear_fwd if kind == "lora" else nf4_matmul
    with grad_off(), record_faces() as taken:
        for shape in [(1, K), (5, K), (2, 3, K), (K,)]:
            x = torch.randn(*shape, dtype=dtype)
            y = layer(x)
            assert y.shape == (*shape[:-1], N) and y.dtype == dtype
            assert_close(y, formula(layer, x), dtype)
    assert held_plan(layer) is not None
    expected_type = fastpeft.backends.extension().HeldCall if held_call == "cpp" else op_plans.PyHeldCall
    assert held_call_type(layer) is expected_type
    assert check_calls == {op.name: 1}, "the weights were checked again on a later call"
    assert [name for name, _ in taken] == [op.name] * 4
    assert {face for _, face in taken} == {op.select(torch.device("cpu"), x.reshape(-1, K), *held_plan(layer).rest)}


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_forced_backend_runs_on_the_plan(kind):
    """use_backend inside the plan's life: the forced face runs (proved by record_faces), then the
    automatic one again."""
    layer = lora_layer() if kind == "lora" else nf4_layer()
    x = torch.randn(2, K)
    with torch.no_grad():
        auto = layer(x)
        plan = held_plan(layer)
        with fastpeft.use_backend("torch"), record_faces() as taken:
            forced = layer(x)
        assert held_plan(layer) is plan and {face for _, face in taken} == {"torch"}
        with record_faces() as taken:
            layer(x)
    assert {face for _, face in taken} == {plan.face(x)}
    assert_close(forced, auto)


@pytest.mark.parametrize("dtype", DTYPES_PLANNED, ids=str)
@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_plan_on_the_cpu_face_calls_its_cpp_kernel_directly(monkeypatch, kind, dtype, held_call):
    """The C++ CPU kernel a plan runs is called as the extension's plain function
    (fastpeft._C.cpu_kernels; from the C++ held call, bound to its arguments after x:
    fastpeft._C.BoundKernel), not through the dispatcher: same output as the dispatcher's kernel,
    bit for bit, and torch.profiler sees the op, once, with its input shapes."""
    if fastpeft.backends.extension() is None:
        pytest.skip(f"not built here: {fastpeft.backends.extension_error()}")
    op = lora_linear_fwd if kind == "lora" else nf4_matmul
    direct_calls = []
    kernel = op.direct_cpu_kernel
    assert kernel is getattr(fastpeft.backends.extension().cpu_kernels, op.name)

    def counting(*args):
        direct_calls.append(args[0].shape)
        return kernel(*args)
    monkeypatch.setattr(op, "direct_cpu_kernel", counting)
    layer = lora_layer(dtype) if kind == "lora" else nf4_layer(dtype)
    x = torch.randn(3, K, dtype=dtype)
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
            y = layer(x)
        bound = layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__.kernel if held_call == "cpp" else None
        if held_call == "cpp":  # the bound kernel ran, not the Python function
            assert isinstance(bound, fastpeft.backends.extension().BoundKernel)
            assert bound.runs == 1 and direct_calls == []
        else:
            assert direct_calls == [x.shape]
        plan = held_plan(layer)
        assert plan.face(x) == "cpu"
        expected = getattr(torch.ops.fastpeft, op.name)(x, *plan.rest)
        y3 = layer(x.unsqueeze(0))  # a 3-D x: the same kernel, its rows and output shaped around it
        assert bound is None or bound.runs == 2
    assert torch.equal(y, expected[0] if kind == "lora" else expected)
    assert torch.equal(y3, y.unsqueeze(0))
    events = [event for event in profile.events() if event.name == op.qualname]
    assert len(events) == 1 and events[0].input_shapes[0] == [3, K]


def test_a_plan_made_without_the_trailing_defaults_runs_with_them():
    """Op.plan takes what the op's call takes: arguments with defaults may be left out, and the
    plan's kernel gets them filled as the dispatcher fills them."""
    q = quantize_nf4(torch.randn(N, K), 64)
    x = torch.randn(3, K)
    plan = nf4_matmul.plan(x, q.packed, q.absmax, q.quant_map, 64, N)
    with torch.no_grad():
        assert_close(plan(x), nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, N))
    assert_close(plan(x), (x.double() @ dequantize_nf4(q).double().T).float())


@pytest.mark.parametrize("dtype", DTYPES_PLANNED, ids=str)
@pytest.mark.parametrize("kind", ["lora", "nf4"])
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_an_nd_x_runs_on_the_plan_and_comes_back_in_its_shape(dtype, kind, grad_off, held_call):
    """A [..., K] x on the direct kernel (in C++: its rows viewed and the output's sizes set in place,
    no reshape): what the full path computes, bit for bit, as a new contiguous [..., N] tensor; x
    untouched; no rows at all; a negated view of x (torch._neg_view) read as its values."""
    layer = lora_layer(dtype) if kind == "lora" else nf4_layer(dtype)
    with grad_off():
        layer(torch.randn(1, K, dtype=dtype))
        bound = layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__.kernel if held_call == "cpp" else None
        runs = bound.runs if bound is not None else 0
        for shape in [(2, 3, K), (4, 1, 1, K), (0, 3, K), (K,)]:
            x = torch.randn(*shape, dtype=dtype)
            before = x.clone()
            y = layer(x)
            assert y.shape == (*shape[:-1], N) and y.is_contiguous() and torch.equal(x, before)
            assert torch.equal(y, layer.forward_unplanned(x))
        assert bound is None or bound.runs == runs + 4, "the bound kernel did not run"
        x = torch.randn(2, 3, K, dtype=dtype)
        assert torch.equal(layer(torch._neg_view(x)), layer.forward_unplanned(-x))


def test_a_long_kernel_runs_without_the_gil_and_computes_as_the_full_path(held_call):
    """The CPU kernels plans call keep the GIL through short kernels and release it for long ones
    (x's rows times the weights' bytes from 4 MiB): both sides compute what the full path does."""
    layer = Linear4bit.from_linear(torch.nn.Linear(2048, 1024).to(torch.bfloat16), 64, double_quant=True).eval()
    with torch.no_grad():
        layer(torch.randn(1, 2048, dtype=torch.bfloat16))
        bound = layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__.kernel if held_call == "cpp" else None
        runs = bound.runs if bound is not None else 0
        for rows in (1, 8):  # 1 MiB of packed weight: 1 MiB and 8 MiB of work
            x = torch.randn(rows, 1, 2048, dtype=torch.bfloat16)
            assert torch.equal(layer(x), layer.forward_unplanned(x))
    assert bound is None or bound.runs == runs + 2, "the bound kernel did not run"


# ---------------------------------------------------------------- what a plan does not take

@pytest.mark.parametrize("kind", ["lora", "nf4"])
@pytest.mark.parametrize("shape", [(3, K), (1, 3, K)])  # 3-D: the held call's view of its rows needs no grad
def test_an_input_needing_a_gradient_trains_through_the_full_path(kind, shape, held_call):
    layer = lora_layer() if kind == "lora" else nf4_layer()
    formula = lora_formula if kind == "lora" else nf4_formula
    with torch.no_grad():
        layer(torch.randn(1, K))
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    formula(layer, xd).backward(dy.double())
    assert_close(x.grad, xd.grad, torch.float32)


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_other_inputs_compute_as_the_full_path(kind):
    """x of another dtype (cast), non-contiguous, under autocast, rows further into their storage:
    what the full path computes."""
    layer = lora_layer() if kind == "lora" else nf4_layer()
    with torch.no_grad():
        layer(torch.randn(1, K))
        for x in [torch.randn(3, K, dtype=torch.bfloat16), torch.randn(K, 3).t(), torch.randn(4, 2 * K)[:, ::2],
                  torch.randn(3, 2, K)[1:], torch.randn(2, K, 3).transpose(1, 2)]:
            expected = layer.forward_unplanned(x)
            got = layer(x)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.randn(3, K)
            got = layer(x)
            assert got.dtype == torch.bfloat16 and torch.equal(got, layer.forward_unplanned(x))


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_wrapper_of_the_ops_run_sees_every_planned_call_while_it_is_there(kind, held_call, monkeypatch):
    """What fastpeft bench's faces_taken installs (a run on the op object): the held call reads the
    op's dict at every call, so a plan made before the wrapper still goes through it, and after it
    calls its kernel directly again (the C++ held call's bound kernel, or the plain function)."""
    if fastpeft.backends.extension() is None:
        pytest.skip(f"not built here: {fastpeft.backends.extension_error()}")
    op = lora_linear_fwd if kind == "lora" else nf4_matmul
    direct_calls = []
    kernel = op.direct_cpu_kernel

    def counting(*args):
        direct_calls.append(args[0].shape)
        return kernel(*args)
    monkeypatch.setattr(op, "direct_cpu_kernel", counting)
    layer = lora_layer() if kind == "lora" else nf4_layer()
    x = torch.randn(2, K)
    seen = []
    run = type(op).run

    def watching(backend, *args):
        seen.append(backend)
        return run(op, backend, *args)

    def direct_runs():
        if held_call == "cpp":
            return layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__.kernel.runs
        return len(direct_calls)
    with torch.no_grad():
        before = layer(x)
        runs_before = direct_runs()
        op.run = watching
        try:
            watched = layer(x)
        finally:
            del op.run
        assert direct_runs() == runs_before, "the wrapper's call ran the kernel directly"
        layer(x)
    assert seen == [held_plan(layer).face(x)]
    assert torch.equal(watched, before)
    assert direct_runs() == runs_before + 1, "after the wrapper the kernel is called directly again"


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_dispatch_mode_sees_the_op_of_a_planned_layer(kind):
    """Under a TorchDispatchMode the layer takes the op's full path, so the mode sees the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))
    layer = lora_layer() if kind == "lora" else nf4_layer()
    op = lora_linear_fwd if kind == "lora" else nf4_matmul
    x = torch.randn(2, K)
    with torch.no_grad():
        expected = layer(x)
        with Names() as mode:
            got = layer(x)
    assert op.qualname in mode.names
    assert_close(got, expected)


@pytest.mark.parametrize("kind", ["lora", "nf4"])
@pytest.mark.parametrize("bad", ["features", "features_3d", "not_a_tensor"])
def test_bad_input_after_a_plan_gets_the_errors_the_full_path_gives(kind, bad):
    layer = lora_layer() if kind == "lora" else nf4_layer()
    with torch.no_grad():
        layer(torch.randn(1, K))
        assert held_plan(layer) is not None
        x = {"features": torch.randn(2, K + 1), "features_3d": torch.randn(2, 2, K - 1),
             "not_a_tensor": [[0.5] * K]}[bad]
        with pytest.raises(Exception) as full:
            layer.forward_unplanned(x)
        with pytest.raises(type(full.value)) as planned:
            layer(x)
    assert str(planned.value) == str(full.value)


def test_a_plan_refuses_bad_weights_and_bad_x_with_the_ops_messages():
    x, w, a, b = torch.randn(2, K), torch.randn(N, K), torch.randn(R, K), torch.randn(N, R)
    with pytest.raises(ValueError, match=r"lora_b must be \[out_features, r\]"):
        lora_linear_fwd.plan(x, w, None, a, b[:, :-1], 1.0, None)
    plan = lora_linear_fwd.plan(x, w, None, a, b, 1.0, None)
    for bad, error, pattern in [(torch.randn(2, K, dtype=torch.float64), TypeError, "dtype"),
                                (torch.randn(2, K + 1), ValueError, "x has 49 features"),
                                (torch.randn(K, 2).t(), ValueError, "contiguous in its last dimension")]:
        assert not plan.fits(bad)
        with pytest.raises(error, match=pattern):
            plan(bad)
    assert_close(plan(x)[0], x @ w.T + (x @ a.T) @ b.T)


def test_a_plan_under_a_forced_backend_that_cannot_run_raises_at_once():
    with fastpeft.use_backend("torch"):
        plan = lora_linear_fwd.plan(torch.randn(1, K), torch.randn(N, K), None, torch.randn(R, K),
                                    torch.randn(N, R), 1.0, None)
    assert plan.face(torch.randn(1, K)) != "torch" or not fastpeft.backends.availability("cpu").usable
    if fastpeft.backends.availability("cuda").usable:
        pytest.skip("every backend can run here")
    with pytest.raises(fastpeft.backends.BackendUnavailable):
        with fastpeft.use_backend("cuda"):
            plan(torch.randn(1, K))


# ---------------------------------------------------------------- a stale plan never runs

def lora_changes():
    """(what is changed, how): each leaves the layer computing its formula on other tensors or values."""
    def replace_base_weight(layer):
        layer.base_layer.weight = nn.Parameter(torch.randn(N, K) / K ** 0.5, requires_grad=False)

    def replace_lora_a(layer):
        layer.lora_A["default"].weight = nn.Parameter(torch.randn(R, K))

    def drop_bias(layer):
        layer.base_layer.bias = None

    def copy_into_lora_b(layer):
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(torch.randn(N, R))

    def scaling(layer):
        layer.scaling["default"] *= 3.0

    def switch_adapter(layer):
        layer.add_adapter("other", R + 2, 4.0, init_lora_weights=False)
        layer.set_adapter("other")

    def load_state_dict(layer):
        other = lora_layer()
        layer.load_state_dict(other.state_dict())

    def load_state_dict_assign(layer):
        other = lora_layer()
        layer.load_state_dict(other.state_dict(), assign=True)

    def set_rank_in_place(layer):
        # same tensors, other shapes (set_ bumps the version): the rank goes from R to R + 1
        with torch.no_grad():
            layer.lora_A["default"].weight.set_(torch.randn(R + 1, K))
            layer.lora_B["default"].weight.set_(torch.randn(N, R + 1))

    def write_into_parameter_dict(layer):
        # as accelerate's set_module_tensor_to_device does: no __setattr__, no hook sees it
        layer.base_layer._parameters["weight"] = nn.Parameter(torch.randn(N, K) / K ** 0.5, requires_grad=False)

    def replace_adapter_module(layer):
        layer.lora_B["default"] = nn.Linear(R, N, bias=False)

    def make_the_adapter_dora(layer):
        # a magnitude for the active adapter: the layer computes DoRA, which no LoRA plan may run
        layer.lora_magnitude_vector["default"] = DoRAMagnitude(torch.rand(N) + 0.5)

    return [replace_base_weight, replace_lora_a, drop_bias, copy_into_lora_b, scaling, switch_adapter,
            load_state_dict, load_state_dict_assign, set_rank_in_place, write_into_parameter_dict,
            replace_adapter_module, make_the_adapter_dora]


@pytest.mark.parametrize("change", lora_changes(), ids=lambda f: f.__name__)
def test_lora_layer_after_a_change_computes_its_formula(change):
    layer = lora_layer()
    x = torch.randn(3, K)
    with torch.no_grad():
        before = layer(x)
        assert held_plan(layer) is not None
        change(layer)
        after = layer(x)
    assert not torch.allclose(after.float(), before.float(), atol=1e-3), "the change changed nothing"
    expected = layer.forward_unplanned(x)
    assert after.dtype == expected.dtype
    if not layer.uses_dora():
        assert_close(after, lora_formula(layer, x), expected.dtype)
    assert_close(after, expected, expected.dtype)


def test_dropout_in_training_mode_is_never_run_by_a_plan_made_in_eval():
    """Training mode under no_grad with dropout: the call drops (dropout is what the layer computes),
    so the plan made in eval mode is neither run nor kept; back in eval a new one runs."""
    layer = LoRALinear.from_linear(nn.Linear(K, N), r=R, lora_alpha=2 * R, lora_dropout=0.5,
                                   init_lora_weights=False).eval()
    x = torch.randn(64, K)
    with torch.no_grad():
        planned = layer(x)
        assert held_plan(layer) is not None
        layer.train()
        torch.manual_seed(0)
        dropped = layer(x)
        assert held_plan(layer) is None
        torch.manual_seed(0)
        assert torch.equal(dropped, layer.forward_unplanned(x))
        assert not torch.allclose(dropped, planned, atol=1e-3), "dropout changed nothing"
        layer.eval()
        assert torch.equal(layer(x), planned) and held_plan(layer) is not None


def test_a_value_absent_when_the_plan_was_made_is_seen_when_it_appears():
    """A base layer without a bias: a bias registered later (a path that read nothing) is used."""
    layer = lora_layer(bias=False)
    x = torch.randn(3, K)
    with torch.no_grad():
        before = layer(x)
        layer.base_layer.register_parameter("bias", nn.Parameter(torch.randn(N), requires_grad=False))
        after = layer(x)
    assert_close(after, before + layer.base_layer.bias, torch.float32)
    assert_close(after, lora_formula(layer, x), torch.float32)


def test_a_tensor_changed_in_place_into_a_bad_argument_gets_the_ops_error():
    """A held tensor's shape changed in place (its version counter moves): the plan is made again,
    by the op's checker, which names the problem, instead of running the stale one."""
    layer = lora_layer()
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        layer.lora_A["default"].weight.set_(torch.randn(R + 1, K))
        with pytest.raises(ValueError, match=r"lora_linear_fwd: lora_b must be \[out_features, r\] = \[40, 7\]"):
            layer(x)


def test_lora_layer_merged_disabled_and_converted():
    layer = lora_layer()
    x = torch.randn(3, K)
    with torch.no_grad():
        expected = lora_formula(layer, x)
        assert_close(layer(x), expected, torch.float32)
        layer.merge()
        assert_close(layer(x), expected, torch.float32)  # the base layer, holding the delta
        layer.unmerge()
        assert_close(layer(x), expected, torch.float32)
        with layer.disable_adapter():
            assert_close(layer(x), layer.base_layer(x), torch.float32)
        assert_close(layer(x), expected, torch.float32)
        layer.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        y = layer(xb)
        assert y.dtype == torch.bfloat16 and held_plan(layer).dtype == torch.bfloat16
        assert_close(y, lora_formula(layer, xb), torch.bfloat16)
        layer.base_layer.float()  # the base alone converted: adapters cast by the full path
        y = layer(x)
        assert y.dtype == torch.float32
        assert_close(y, lora_formula(layer, x), torch.bfloat16)


def nf4_changes():
    def requantise(layer):
        layer.q = quantize_nf4(torch.randn(N, K), 64)

    def replace_bias(layer):
        layer.bias = nn.Parameter(torch.randn(N), requires_grad=False)

    def load_state_dict(layer):
        layer.load_state_dict(nf4_layer().state_dict())

    def load_state_dict_assign(layer):
        layer.load_state_dict(nf4_layer().state_dict(), assign=True)

    def double_quantise(layer):
        layer.q = quantize_nf4(layer.dequantized_weight() * 2, 64, double_quant=True)

    return [requantise, replace_bias, load_state_dict, load_state_dict_assign, double_quantise]


@pytest.mark.parametrize("change", nf4_changes(), ids=lambda f: f.__name__)
def test_nf4_layer_after_a_change_computes_its_formula(change):
    layer = nf4_layer()
    x = torch.randn(3, K)
    with torch.no_grad():
        before = layer(x)
        plan = held_plan(layer)
        assert plan is not None
        change(layer)
        after = layer(x)
    assert held_plan(layer) is not plan
    assert not torch.allclose(after, before, atol=1e-3), "the change changed nothing"
    assert_close(after, nf4_formula(layer, x), torch.float32)
    assert torch.equal(after, layer.forward_unplanned(x))


def test_a_merge_into_a_4bit_base_is_seen_by_the_base_layers_plan():
    layer = LoRALinear(nf4_layer(), r=R, lora_alpha=2 * R, init_lora_weights=False).eval()
    x = torch.randn(2, K)
    with torch.no_grad():
        base_before = layer.base_layer(x)
        assert held_plan(layer.base_layer) is not None
        with pytest.warns(UserWarning, match="requantised"):
            layer.merge()
        merged = layer(x)
    assert not torch.allclose(merged, base_before, atol=1e-3)
    assert torch.equal(merged, layer.base_layer.forward_unplanned(x))


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_copies_hold_no_plan_and_compute_on_their_own_tensors(kind):
    layer = lora_layer() if kind == "lora" else nf4_layer()
    x = torch.randn(2, K)
    with torch.no_grad():
        y = layer(x)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert held_plan(twin) is None
            assert torch.equal(twin(x), y)
            assert held_plan(twin) is not None and held_plan(twin) is not held_plan(layer)
        twin = copy.deepcopy(layer)
        twin(x)
        if kind == "lora":
            twin.lora_B["default"].weight.mul_(2.0)
        else:
            twin.bias.mul_(2.0)
        assert torch.equal(layer(x), y) and not torch.equal(twin(x), y)


# ---------------------------------------------------------------- the held call's own contract

def test_the_held_calls_numbers_are_the_cpp_sides(held_call):
    """op_plans.Read and ops.Compare write the terms the C++ HeldCall reads: the same numbers."""
    cpp = getattr(fastpeft.backends.extension(), "HeldCall", None)
    if cpp is None:
        pytest.skip(f"not built here: {fastpeft.backends.extension_error()}")
    assert cpp.READS == {r.name: int(r) for r in op_plans.Read}
    assert cpp.COMPARES == {c.name: int(c) for c in fastpeft.ops.Compare}


class Scaled(nn.Module):
    """A toy layer whose paths read every kind of term: a parameter, a plain attribute, a dict's
    entry, a property, a name held nowhere."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(N, K))
        self.gains = {"a": 2.0}
        self.mode = "plain"

    @property
    def doubled(self):
        return self.gains["a"] * 2

    def forward(self, x):
        return x @ self.weight.T


PATHS = (("weight",), ("gains", "a"), ("mode",), ("doubled",), ("bias",))


@pytest.mark.parametrize("change", ["weight", "weight_in_place", "gain", "mode", "property", "bias_appears",
                                    "nan_gain_unchanged"])
def test_every_kind_of_term_sees_its_change(change, held_call):
    layer = Scaled()
    doubled = Scaled.__dict__["doubled"]
    if change == "nan_gain_unchanged":
        layer.gains["a"] = float("nan")
    nf4 = nf4_layer()
    with torch.no_grad():
        nf4(torch.randn(2, K))
    # any plan of K features: the terms are the toy's (a nan's property would be a new nan each read)
    paths = [p for p in PATHS if p != ("doubled",)] if change == "nan_gain_unchanged" else PATHS
    held = op_plans.HeldPlan(held_plan(nf4), layer, paths, K, N)
    assert held.holds(layer)
    with torch.no_grad():
        if change == "weight":
            layer.weight = nn.Parameter(torch.randn(N, K))
        elif change == "weight_in_place":
            layer.weight.mul_(2)
        elif change == "gain":
            layer.gains["a"] = 3.0
        elif change == "mode":
            layer.mode = "other"
        elif change == "property":
            type(layer).doubled = property(lambda self: 5.0)
        elif change == "bias_appears":
            layer.register_buffer("bias", torch.zeros(N))
    try:
        # a nan that was not touched is the same value: the plan still holds
        assert held.holds(layer) is (change == "nan_gain_unchanged")
    finally:
        Scaled.doubled = doubled


def test_a_parameter_as_x_takes_the_layers_own_path(held_call):
    """Only a plain Tensor runs on a plan (an nn.Parameter is a subclass of Tensor)."""
    layer = nf4_layer()
    x = torch.randn(2, K)
    with torch.no_grad():
        layer(x)
        assert layer.__dict__[op_plans.PLAN_ATTRIBUTE].call(layer, nn.Parameter(x)) is None
        assert layer.__dict__[op_plans.PLAN_ATTRIBUTE].call(layer, x) is not None


def test_eval_with_grad_on_and_adapters_needing_grad_builds_a_graph():
    """Inference mode off, grad on, x without grad, but the adapter's weights need it: the plan
    must not run (it has no autograd); the layer's output carries a graph to the adapter."""
    layer = lora_layer()
    x = torch.randn(3, K)
    with torch.no_grad():
        layer(x)  # a plan is held
    y = layer(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert layer.lora_A[layer.active_adapter].weight.grad is not None


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_layer_in_a_reference_cycle_through_its_plan_is_collected(kind, held_call):
    """A hook on a submodule the plan checks that refers back to the layer makes a cycle through
    the held call: the garbage collector must see into the held call to free it."""
    import gc
    import weakref

    layer = lora_layer() if kind == "lora" else nf4_layer()
    if kind == "lora":
        layer.base_layer.register_forward_hook(lambda *args, _layer=layer: None)
    else:
        layer.weight.owner = layer  # the packed weight, which the plan holds, refers back to the layer
    with torch.no_grad():
        layer(torch.randn(2, K))
    assert held_plan(layer) is not None
    dead = weakref.ref(layer)
    del layer
    gc.collect()
    assert dead() is None


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_swapping_tensors_works_while_a_plan_holds_them(kind):
    """Module conversions under set_swap_module_params_on_conversion swap tensors in place, which
    torch refuses for a tensor referenced from C++: a plan must hold its tensors from Python only.
    A LoRA layer's base layer converted alone does not drop the LoRA layer's plan."""
    layer = lora_layer() if kind == "lora" else nf4_layer()
    with torch.no_grad():
        layer(torch.randn(2, K))
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        (layer.base_layer if kind == "lora" else layer).to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    dtype = layer.base_layer.weight.dtype if kind == "lora" else layer.bias.dtype
    assert dtype == torch.float64


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_a_held_call_prefetches_what_the_layer_called_after_it_last_reads(kind, held_call):
    """Read-ahead (C++): after layer a then layer b, a's call prefetches b's reads (b, its instance
    dict, its hook tables and plan, its tensors' objects and first bytes) and b's prefetches a's;
    a layer called twice in a row never prefetches its own reads; once b is gone, no held call
    knows it as the last called, a's prefetches are stale addresses, and its calls still compute."""
    import gc

    if held_call != "cpp":
        pytest.skip("the Python held call prefetches nothing")
    make = lora_layer if kind == "lora" else nf4_layer
    a, b, alone = make(), make(), make()
    x = torch.randn(3, K)
    with torch.no_grad():
        alone(x), a(x), b(x), a(x), b(x)
    call_a, call_b, call_alone = (layer.__dict__[op_plans.PLAN_ATTRIBUTE].call.__self__ for layer in (a, b, alone))
    reads_b = call_b.reads
    assert reads_b and call_a.reads_ahead == reads_b and call_b.reads_ahead == call_a.reads
    addresses = {address for address, _ in reads_b}
    for obj in (b, b.__dict__, b._forward_hooks, b._forward_pre_hooks, b.__dict__[op_plans.PLAN_ATTRIBUTE]):
        assert id(obj) in addresses
    weight = b.base_layer.weight if kind == "lora" else b.weight
    assert (weight.data_ptr(), min(weight.nbytes, 2048)) in reads_b
    with torch.no_grad():
        alone(x), alone(x)
    assert call_b.reads_ahead == call_alone.reads and call_alone.reads_ahead == call_a.reads  # never its own

    last_called = type(call_a).last_called_serial
    with torch.no_grad():
        b(x)
    assert last_called() == call_b.serial
    del b, call_b, call_alone, alone, weight, obj
    gc.collect()
    assert last_called() is None, "a freed held call is still the last called"
    with torch.no_grad():
        y = a(x)
    formula = lora_formula if kind == "lora" else nf4_formula
    assert_close(y, formula(a, x), y.dtype)
