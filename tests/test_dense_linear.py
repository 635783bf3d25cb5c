"""dense_linear: every face against the reference (torch's F.linear), the CPU face's paths per
instruction set, clear refusals, and DenseLinear, the output layer quantize_model leaves in full
precision."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft import backends
from fastpeft.nn import DenseLinear, Linear4bit
from fastpeft.ops import dense_linear, record_faces
from fastpeft.ops.dense_linear import dense_linear_reference

import models
from conftest import (DTYPES, assert_close, assert_refused_before_any_face, face_params, fresh_seed,
                      needs_extension, on_face, wide_rows)

# (M, K, N): one token, K = 1 and K = 0 (y is the bias); sizes off every block and vector width
# (8, 16, 32, 64), one token among them (the CPU GEMV's four chains of 32 and their tails); the
# GEMV's row counts 1-4 and one above them (torch's matmul); more rows than the Triton face's
# decode tile (16).
SHAPES = [(1, 1, 3), (2, 0, 3), (1, 7, 5), (1, 100, 19), (1, 576, 130),
          (2, 33, 70), (3, 100, 19), (4, 576, 130), (5, 64, 64), (17, 40, 33)]


def make_inputs(M, K, N, dtype, bias=True, seed=None):
    """Fresh random inputs scaled so that every output is O(1)."""
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * max(K, 1) ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("device,backend", face_params(dense_linear))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_every_face_matches_the_reference(device, backend, dtype, M, K, N, bias):
    x, w, b = (t if t is None else t.to(device) for t in make_inputs(M, K, N, dtype, bias))
    with on_face(backend):
        y = dense_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, dense_linear_reference(x.double(), w.double(), None if b is None else b.double()), dtype)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (1, 576, 130), (2, 33, 70), (3, 100, 19), (4, 576, 130), (5, 64, 64)])
def test_the_cpu_face_takes_the_gemv_for_few_rows_with_avx2(cpu_isa, dtype, M, K, N):
    """The rule written out independently: AVX2 or above and at most 4 rows (3 for bf16 where the
    CPU has bf16 dot products), the GEMV; else torch's matmul. Each path against the reference, in
    rows that start off alignment (wide_rows)."""
    ext = backends.extension()
    x, w, b = make_inputs(M, K, N, dtype)
    x, w = wide_rows(x), wide_rows(w)
    with on_face("cpu"):
        y = dense_linear(x, w, b)
    rows = 3 if dtype == torch.bfloat16 and cpu_isa == "avx512_bf16" else 4
    path = "gemv-avx2" if cpu_isa != "portable" and M <= rows else "aten"
    assert ext.dense_cpu_last_path() == path
    assert ext.dense_cpu_path(M, str(dtype).removeprefix("torch.")) == path
    assert_close(y, dense_linear_reference(x.double(), w.double(), b.double()), dtype)


@pytest.mark.parametrize("device,backend", face_params(dense_linear))
def test_a_strided_bias(device, backend):
    x, w, b = make_inputs(3, 40, 9, torch.float32)
    bias = torch.randn(18)[::2]
    with on_face(backend):
        y = dense_linear(x.to(device), w.to(device), bias.to(device))
    assert_close(y.cpu(), dense_linear_reference(x, w, bias))


@needs_extension
def test_the_cpu_face_takes_no_rows():
    x, w, b = make_inputs(0, 9, 4, torch.bfloat16)
    with on_face("cpu"):
        assert dense_linear(x, w, b).shape == (0, 4)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda x, w, b: dense_linear(x.double(), w.double(), b.double()), TypeError, "x has dtype torch.float64"),
    (lambda x, w, b: dense_linear(x, w.half(), b), TypeError, "weight has dtype torch.float16 but x has"),
    (lambda x, w, b: dense_linear(x[0], w, b), ValueError, "x must be 2-D"),
    (lambda x, w, b: dense_linear(x, w[:, :5], b), ValueError, r"weight must be \[out_features, in_features\] = "
                                                               r"\[N, 6\]; got \[4, 5\]"),
    (lambda x, w, b: dense_linear(x, w, b[:3]), ValueError, r"bias must be \[out_features\] = \[4\]; got \[3\]"),
    (lambda x, w, b: dense_linear(x, w.t().contiguous().t(), b), ValueError, "weight must be contiguous in its last"),
    (lambda x, w, b: dense_linear(x, w.to("meta"), b), ValueError, "weight is on meta but x is on cpu"),
], ids=["float64", "dtype", "1-D", "K", "bias", "strided weight", "device"])
def test_bad_input_is_refused_before_any_face(monkeypatch, call, exc, pattern):
    x, w, b = make_inputs(2, 6, 4, torch.float32)
    assert_refused_before_any_face(monkeypatch, dense_linear, lambda: call(x, w, b), exc, pattern)


# ---------------------------------------------------------------- DenseLinear

def linear_pair(dtype, bias=True, K=24, N=40):
    """An nn.Linear of fresh random values in `dtype`, and a DenseLinear over a deep copy of it."""
    torch.manual_seed(fresh_seed())
    linear = torch.nn.Linear(K, N, bias=bias).to(dtype)
    return linear, DenseLinear.from_linear(copy.deepcopy(linear))


def test_from_linear_holds_the_same_parameters_and_state_dict():
    linear = torch.nn.Linear(24, 40)
    layer = DenseLinear.from_linear(linear)
    assert isinstance(layer, torch.nn.Linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert list(layer.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    with pytest.raises(TypeError, match="takes a torch.nn.Linear, not a DenseLinear"):
        DenseLinear.from_linear(layer)
    no_bias = DenseLinear.from_linear(torch.nn.Linear(24, 40, bias=False))
    assert dict(no_bias.named_parameters(remove_duplicate=False)).keys() == {"weight"}
    assert list(no_bias._parameters) == ["weight", "bias"]  # as nn.Linear's: a bias can be registered later
    no_bias.register_parameter("bias", torch.nn.Parameter(torch.zeros(40)))


def test_make_dense_keeps_the_module_its_hooks_and_attributes():
    linear = torch.nn.Linear(24, 40)
    calls = []
    linear.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    linear.note = "kept"
    assert DenseLinear.make_dense(linear) is linear and type(linear) is DenseLinear and linear.note == "kept"
    with torch.no_grad(), record_faces() as taken:
        linear(torch.randn(2, 24))
    assert calls == [(2, 40)] and [name for name, _ in taken] == ["dense_linear"]
    with pytest.raises(TypeError, match="make_dense takes a torch.nn.Linear, not a DenseLinear"):
        DenseLinear.make_dense(linear)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_inference_runs_the_op_and_computes_what_nn_linear_computes(dtype, bias):
    linear, layer = linear_pair(dtype, bias)
    x = torch.randn(2, 3, 24).to(dtype)
    with torch.no_grad(), record_faces() as taken:
        y = layer(x)
    assert [name for name, _ in taken] == ["dense_linear"]
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert_close(y, linear(x).detach(), dtype)
    with torch.inference_mode(), record_faces() as taken:
        assert_close(layer(x[0, :1]), linear(x[0, :1]), dtype)  # one token
    assert [name for name, _ in taken] == ["dense_linear"]


def test_training_is_nn_linear_itself():
    """With a weight that needs a gradient, the forward is nn.Linear's (no op runs): the same
    outputs and gradients, bit for bit."""
    linear, layer = linear_pair(torch.float32)
    x = torch.randn(5, 24)
    with record_faces() as taken:
        layer(x).square().sum().backward()
    assert taken == []
    linear(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, linear.weight.grad) and torch.equal(layer.bias.grad, linear.bias.grad)


def test_what_the_op_does_not_take_is_nn_linear_s_own_path_and_errors():
    linear, layer = linear_pair(torch.bfloat16)
    with torch.no_grad(), record_faces() as taken:
        with pytest.raises(RuntimeError) as expected:
            linear(torch.randn(3, 24))  # float32 x on a bf16 weight
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            layer(torch.randn(3, 24))
        with pytest.raises(RuntimeError):
            layer(torch.randn(3, 25, dtype=torch.bfloat16))  # another width: not reshaped into rows of 24
        x = torch.randn(3, 48, dtype=torch.bfloat16)[:, ::2]  # strided rows: made contiguous for the op
        assert_close(layer(x), linear(x), torch.bfloat16)
        x = torch.randn(24, dtype=torch.bfloat16)  # one vector: y is [out_features], as nn.Linear's
        y = layer(x)
        assert y.shape == (40,)
        assert_close(y, linear(x), torch.bfloat16)
    assert [name for name, _ in taken] == ["dense_linear"] * 2


def test_autocast_is_nn_linear_s():
    linear, layer = linear_pair(torch.float32)
    x = torch.randn(3, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), record_faces() as taken:
        y = layer(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, linear(x))
    assert taken == []


def test_the_weight_s_own_shape_is_read_at_each_call():
    """nn.Linear's forward reads the weight, never in_features / out_features: a weight replaced by
    one of another shape (a vocabulary resized by hand) works the same."""
    layer = DenseLinear.from_linear(torch.nn.Linear(8, 4))
    layer.weight = torch.nn.Parameter(torch.randn(6, 10))
    layer.bias = torch.nn.Parameter(torch.randn(6))
    x = torch.randn(2, 10)
    with torch.no_grad(), record_faces() as taken:
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert [name for name, _ in taken] == ["dense_linear"]
    layer.weight = torch.nn.Parameter(torch.randn(6, 0))  # no input features: y is the bias
    with torch.no_grad():
        assert torch.equal(layer(torch.randn(2, 0)), layer.bias.expand(2, 6))


# ---------------------------------------------------------------- in a model

def tied_llama(seed):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def test_quantize_model_makes_the_output_layer_dense_and_keeps_it_tied():
    model = tied_llama(fresh_seed())
    plain = copy.deepcopy(model)
    head = model.lm_head
    hooked = []
    head.register_forward_hook(lambda module, args, out: hooked.append(out.shape))
    fastpeft.quantize_model(model)
    fastpeft.quantize_model(plain)
    assert model.lm_head is head and type(head) is DenseLinear and head.weight is model.model.embed_tokens.weight
    plain.lm_head = torch.nn.Linear(64, models.VOCAB, bias=False)
    plain.lm_head.weight = plain.model.embed_tokens.weight
    ids = torch.randint(1, models.VOCAB, (2, 7))
    with torch.no_grad(), record_faces() as taken:
        logits = model(input_ids=ids).logits
    assert [name for name, _ in taken if name == "dense_linear"] == ["dense_linear"]  # the output layer, once
    assert hooked == [(2, 7, models.VOCAB)]  # the module's own hooks still run
    with torch.no_grad():
        assert_close(logits, plain(input_ids=ids).logits, torch.float32)
    assert fastpeft.quantize.dense_output_layers(model) == []  # already dense: nothing to do


def test_quantizing_every_layer_leaves_no_dense_output_layer():
    model = fastpeft.quantize_model(tied_llama(fresh_seed()), skip_modules=[])
    assert isinstance(model.lm_head, Linear4bit)


def test_a_saved_4bit_model_loads_with_a_dense_output_layer(tmp_path):
    model = fastpeft.quantize_model(tied_llama(fresh_seed()), double_quant=True)
    fastpeft.save_quantized_model(model, tmp_path)
    loaded = fastpeft.load_quantized_model(str(tmp_path))
    assert type(loaded.lm_head) is DenseLinear and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(1, models.VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dense_output_layer_under_torch_compile():
    model = fastpeft.quantize_model(tied_llama(fresh_seed()))
    x = torch.randn(3, 64)
    with torch.no_grad():
        eager = model.lm_head(x)
        compiled = torch.compile(model.lm_head, fullgraph=True, backend="eager")(x)
    assert_close(compiled, F.linear(x, model.lm_head.weight), torch.float32)
    assert_close(eager, compiled, torch.float32)
