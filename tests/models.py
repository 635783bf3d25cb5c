"""Tiny models with random weights, built from transformers configs (no downloads)."""

import torch

VOCAB = 64


def tiny_model(kind: str, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 48):
    """A 2-layer model of `kind` with random weights, in eval mode. hidden_size and intermediate_size
    apply to llama (the default 32 and 48 are shorter than an NF4 block of 64)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, num_labels=3)
        model = tf.BertForSequenceClassification(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


# (target_modules, modules_to_save) per model: attention and MLP linears, and a head trained fully.
TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "gpt2": (["c_attn", "c_proj", "c_fc"], None),
    "bert": (["query", "value", "dense"], ["classifier"]),
    "qwen2": ("all-linear", None),
}


def model_inputs(kind: str, batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def output_of(model, inputs):
    out = model(**inputs)
    return out.logits


def train_on_own_tokens(model, input_ids, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam over the trainable parameters of a causal LM, each step predicting `input_ids` from
    themselves; the losses, one a step."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
