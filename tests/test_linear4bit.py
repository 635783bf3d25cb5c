"""Linear4bit (NF4 base weights) and QLoRA through the public API; the nf4_matmul op beneath is
tested in test_nf4_matmul.py."""

import copy

import pytest
import torch

import fastpeft
from fastpeft.nn import DenseLinear, Linear4bit, LoRALinear

from conftest import DTYPES, assert_close, peak_cpu_bytes_above_start
import models
from models import model_inputs, tiny_model, train_on_own_tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 96, 70), (3, 45, 33), (17, 128, 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_and_backward_match_dequantise_then_matmul(dtype, M, K, N, double_quant):
    lin = torch.nn.Linear(K, N).to(dtype)
    layer = Linear4bit.from_linear(lin, blocksize=64, double_quant=double_quant)
    w = layer.dequantized_weight()
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x.detach(), w, lin.bias.detach())
    assert y.dtype == dtype
    assert_close(y, expected, dtype)
    g = torch.randn_like(y)
    y.backward(g)
    assert_close(x.grad, g @ w, dtype)


def test_reads_a_bitsandbytes_layer_and_computes_what_it_computes():
    bnb = pytest.importorskip("bitsandbytes")  # only this test needs it
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 72)
    ref = bnb.nn.Linear4bit(128, 72, quant_type="nf4", compress_statistics=True)
    ref.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    ref.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    ref = ref.to("cpu")
    ours = Linear4bit.from_bnb(ref)
    x = torch.randn(5, 128)
    assert_close(ours(x), ref(x))
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_bytes_per_weight():
    lin = torch.nn.Linear(512, 512, bias=False)
    for double_quant, limit in ((False, 0.57), (True, 0.52)):
        layer = Linear4bit.from_linear(lin, 64, double_quant)
        stored = sum(t.numel() * t.element_size() for k, t in layer.state_dict().items()
                     if k != "weight.quant_state.bitsandbytes__nf4" and k != "weight.quant_map"
                     and k != "weight.nested_quant_map")
        assert stored / lin.weight.numel() <= limit, (double_quant, stored / lin.weight.numel())
        assert not any(t.is_floating_point() and t.numel() >= lin.weight.numel() for t in layer.state_dict().values())


def test_state_dict_round_trip_and_bad_loads():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), double_quant=True)
    other = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(other(x), layer(x))
    wrong = Linear4bit.from_linear(torch.nn.Linear(32, 64))
    with pytest.raises(RuntimeError, match=r"weight: shape \[32, 64\] does not match \[64, 32\]"):
        wrong.load_state_dict(layer.state_dict())
    broken = dict(layer.state_dict())
    broken.pop("weight.nested_absmax")
    with pytest.raises(RuntimeError, match="missing 'weight.nested_absmax'"):
        other.load_state_dict(broken)


@pytest.mark.parametrize("double_quant", [False, True])
def test_the_4bit_weight_is_registered_module_state(double_quant):
    """Every torch tool sees the NF4 weight: a frozen parameter of packed bytes and the quantisation
    state as buffers, and nothing else the module holds."""
    layer = Linear4bit.from_linear(torch.nn.Linear(96, 40), double_quant=double_quant)
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    assert params["weight"].dtype == torch.uint8 and not params["weight"].requires_grad
    assert params["weight"].numel() == 96 * 40 // 2
    expected = {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if double_quant else set())
    assert set(buffers) == expected
    q = layer.q
    assert q.packed is layer.weight and q.absmax is layer.absmax and q.double_quant == double_quant
    held = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    state = {k: v for k, v in layer.state_dict().items() if not k.endswith("bitsandbytes__nf4")}
    assert held == sum(t.numel() * t.element_size() for t in state.values())


def test_dtype_casts_keep_the_nf4_tensors_and_device_moves_take_them():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), double_quant=True, quant_storage=torch.bfloat16)
    x = torch.randn(3, 64)
    before = layer(x)
    packed, absmax, bias = layer.weight.clone(), layer.absmax.clone(), layer.bias.detach().clone()
    layer.half().float().to(torch.bfloat16)  # a model-wide cast must not rewrite the bytes or the scales
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    assert layer.absmax.dtype == absmax.dtype and torch.equal(layer.absmax, absmax)
    assert layer.bias.dtype == torch.bfloat16  # the bias is a regular parameter and takes the cast
    layer.bias.data = bias  # (rounded through float16 above)
    assert torch.equal(layer(x), before)
    moved = layer.to("meta")
    assert all(t.device.type == "meta" for t in [*moved.parameters(), *moved.buffers()])


def test_a_qlora_model_state_dict_round_trip():
    """A quantised model with LoRA saves every tensor under bitsandbytes' and PEFT's module keys, and a
    model built the same way from other random weights computes the same after loading it."""
    def build(seed):
        model = fastpeft.quantize_model(tiny_model("llama", seed=seed, hidden_size=64, intermediate_size=96),
                                        double_quant=True)
        torch.manual_seed(seed)
        return fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   init_lora_weights=False))

    source, target = build(0), build(1)
    state = source.state_dict()
    key = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert {key, key + ".absmax", key + ".nested_absmax", key + ".quant_state.bitsandbytes__nf4",
            "model.layers.0.self_attn.q_proj.lora_A.default.weight"} <= set(state)
    ids = model_inputs("llama", batch=2, seq=7)["input_ids"]
    assert not torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)
    target.load_state_dict(state)
    assert torch.equal(target(input_ids=ids).logits, source(input_ids=ids).logits)
    trainable, total = fastpeft.methods.count_parameters(source)
    assert total == sum(p.numel() for n, p in source.named_parameters() if ".weight" not in n or "lora_" in n
                        or "norm" in n or "embed" in n or "lm_head" in n) + sum(
        m.out_features * m.in_features for m in source.modules() if isinstance(m, Linear4bit))
    assert trainable == sum(p.numel() for n, p in source.named_parameters() if "lora_" in n)
    footprint = source.get_memory_footprint()
    assert footprint == sum(t.numel() * t.element_size() for t in [*source.parameters(), *source.buffers()])


def test_torch_compile_fullgraph():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    x = torch.randn(7, 64)
    assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_quantize_model_and_qlora_training():
    model = fastpeft.quantize_model(tiny_model("llama"), double_quant=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output layer stays in full precision
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.quantized
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    ids = model_inputs("llama", batch=8, seq=12)["input_ids"]
    losses = train_on_own_tokens(model, ids, steps=25)
    assert losses[-1] < losses[0] - 0.3, losses
    with pytest.warns(UserWarning, match="requantised to NF4"):
        fastpeft.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def _classifier_llama(seed):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg).eval()


# (model, the linears kept in full precision by default: output layer, task head, pooler)
KEPT = {"llama": ["lm_head"], "bert": ["bert.pooler.dense", "classifier"], "llama-classifier": ["score"]}


def _fresh_model(kind):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh weights each run
    return _classifier_llama(seed) if kind == "llama-classifier" else tiny_model(kind, seed=seed)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Linear4bit))}


@pytest.mark.parametrize("kind", list(KEPT))
def test_quantize_model_keeps_output_layer_task_heads_and_pooler_in_full_precision(kind):
    """As transformers + bitsandbytes keep the output layer: the body is 4-bit, the output layer, a
    classifier's head and a BERT pooler stay nn.Linear with their own weights (the output layer a
    DenseLinear), and the logits are the reference path's (every 4-bit layer computed as its
    dequantised weight, the rest as before)."""
    model = _fresh_model(kind)
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    fastpeft.quantize_model(model)
    layers = _linears(model)
    assert sorted(n for n, m in layers.items() if type(m) in (torch.nn.Linear, DenseLinear)) == KEPT[kind]
    assert [n for n, m in layers.items() if type(m) is DenseLinear] == (["lm_head"] if kind == "llama" else [])
    body = [n for n in layers if n not in KEPT[kind]]
    assert body and all(isinstance(layers[n], Linear4bit) for n in body)
    assert all(torch.equal(layers[n].weight, original[n]) for n in KEPT[kind])
    reference = copy.deepcopy(model)
    for name in body:  # the reference path: each 4-bit layer as nn.Linear over its dequantised weight
        q = layers[name]
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        linear.weight.data = q.dequantized_weight().float()
        if q.bias is not None:
            linear.bias.data = q.bias.detach().clone()
        fastpeft.targeting.replace_module(reference, name, linear)
    ids = torch.randint(1, 64 if kind == "llama-classifier" else models.VOCAB, (3, 9))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, torch.float32)


def test_quantize_model_skip_modules_replaces_the_default():
    """skip_modules is bitsandbytes' llm_int8_skip_modules: a list replaces the default ([]: every
    linear 4-bit, the head too), each entry a module name, suffix or regex, everything inside kept."""
    model = fastpeft.quantize_model(_fresh_model("bert"), skip_modules=[])
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    model = fastpeft.quantize_model(_fresh_model("bert"), skip_modules=["pooler", r"bert\.encoder\.layer\.1"])
    kept = sorted(n for n, m in _linears(model).items() if type(m) is torch.nn.Linear)
    assert kept == ["bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.attention.self.key",
                    "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value",
                    "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense",
                    "bert.pooler.dense"]
    assert isinstance(model.classifier, Linear4bit)


@pytest.mark.parametrize("skip, error", [("lm_head", TypeError), (["lm_head", 3], TypeError), (["(lm"], ValueError)])
def test_quantize_model_refuses_a_bad_skip_list_and_leaves_the_model_untouched(skip, error):
    model = _fresh_model("llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match="skip_modules"):
        fastpeft.quantize_model(model, skip_modules=skip)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_qlora_training_step_keeps_no_full_precision_weight():
    """The weights dominate this model (64-token vocabulary, 24 tokens a batch): a surviving float
    copy of them would show in the tensors saved for backward and in the step's peak memory."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = fastpeft.quantize_model(tf.LlamaForCausalLM(cfg), double_quant=True)
    fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    float_weight_bytes = sum(m.out_features * m.in_features * 4 for m in quantized)
    smallest = min(m.out_features * m.in_features for m in quantized)
    ids = model_inputs("llama", batch=2, seq=12)["input_ids"]  # 24 rows: the tiled path, not the GEMV

    saved = []

    def keep_size(t):
        saved.append((t.numel(), t.is_floating_point()))
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # warm-up: lazily built state is not what is measured
    model.zero_grad(set_to_none=False)
    saved.clear()
    peak = peak_cpu_bytes_above_start(step)
    assert saved and not [n for n, is_float in saved if is_float and n >= smallest]
    # measured 1.9 MB of 6.3 MB: one 256-row dequantised tile (0.8 MB for [768, 256]) plus activations
    # and gradients; float copies of the weights surviving the step would add 6.3 MB on their own
    assert peak < 0.5 * float_weight_bytes, (peak, float_weight_bytes)
    for m in quantized:
        assert not [t for t in list(m.buffers()) + list(m.parameters())
                    if t.is_floating_point() and t.numel() >= m.out_features * m.in_features]


def test_merge_into_nf4_is_the_requantised_sum():
    from fastpeft.quant import quantize_nf4

    base = Linear4bit.from_linear(torch.nn.Linear(64, 48), double_quant=True)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    expected = quantize_nf4(base.dequantized_weight().float() + layer.delta_weight(), 64, True)
    with pytest.warns(UserWarning, match="added to the dequantised weight"):
        layer.merge()
    assert torch.equal(base.q.packed, expected.packed) and torch.equal(base.q.absmax, expected.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_layer_forward_and_gradients_match_the_reference(dtype, dropout):
    """The fused QLoRA layer against dequantise-then-LoRA in plain PyTorch: output, dx, dA, dB."""
    K, N, r = 80, 48, 6
    base = Linear4bit.from_linear(torch.nn.Linear(K, N).to(dtype), 64, double_quant=True)
    layer = LoRALinear(base, r=r, lora_alpha=12, lora_dropout=dropout, init_lora_weights="gaussian")
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 at init would hide its gradient path
    layer.to(dtype).train()
    x = torch.randn(2, 9, K, dtype=dtype, requires_grad=True)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask
    x_lora = torch.nn.functional.dropout(x_ref, dropout, training=True) if dropout else x_ref
    w = base.dequantized_weight()
    y_ref = torch.nn.functional.linear(x_ref, w, base.bias) + layer.scaling["default"] * (x_lora @ a_ref.t()) @ b_ref.t()
    y_ref.backward(g)
    assert_close(y, y_ref, dtype)
    for got, ref in ((x.grad, x_ref.grad), (a.grad, a_ref.grad), (b.grad, b_ref.grad)):
        assert_close(got, ref, dtype)


def test_qlora_linear_quantises_and_trains_like_lora_over_linear4bit():
    lin = torch.nn.Linear(96, 40)
    layer = fastpeft.nn.QLoRALinear.from_linear(lin, r=4, lora_alpha=8, init_lora_weights="gaussian")
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.q.double_quant and layer.quantized
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.default.weight",
                                                                           "lora_B.default.weight"}
    x = torch.randn(5, 96)
    assert_close(layer(x), layer.base_layer(x))  # B = 0 at init
    layer(x).sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="needs a fastpeft Linear4bit base"):
        fastpeft.nn.QLoRALinear(lin)


def test_the_output_takes_the_inputs_dtype_as_bitsandbytes_returns_it():
    """A bf16 activation into a layer quantised from float32 comes out bf16 (the next layer, an
    FSDP2 bf16 policy's lm_head say, takes bf16); under autocast the output is autocast's dtype."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    qlora = LoRALinear.from_linear(Linear4bit.from_linear(torch.nn.Linear(64, 32)), r=4, init_lora_weights=False)
    x = torch.randn(3, 64)
    for module in (layer, qlora):
        y = module(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert_close(y, module(x.to(torch.bfloat16).float()).to(torch.bfloat16))
        assert module(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(x).dtype == torch.bfloat16
