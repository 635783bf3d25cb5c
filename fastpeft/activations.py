"""The activations the fused adapter-block op computes, by name, in the order every face indexes them.

One tuple for the op's checks (:mod:`fastpeft.ops.adapter_block`), the Triton kernel's runtime
switch (``fastpeft/kernels/adapter_block.py``: ``ACT`` is an index into it) and the methods that
map their ``non_linearity`` onto it. ``gelu`` is the exact, erf form (``nn.GELU()``'s default),
``gelu_tanh`` the tanh approximation (``nn.GELU(approximate="tanh")``).
"""

ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
