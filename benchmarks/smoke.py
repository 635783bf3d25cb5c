"""Every fast face of every op against its reference, at a ragged shape and at the bench's shapes:
the device check's first look at a GPU (a face that crashes, or computes wrong, shows here within
seconds; the full `pytest -m gpu` compiles hundreds of variants and runs last).

    python benchmarks/smoke.py --device cuda --op lora_linear --jsonl OUT/smoke.jsonl
    python benchmarks/smoke.py --device cpu --quick ...     # the CPU stand-in: Triton interpreted

One JSON line per (op, case, dtype, face): ok, the error (a mismatch or an exception, as text),
the largest difference from the reference relative to its largest magnitude, and the face's time
for one call (after one warm-up call, which compiles). Run one op per process, so an illegal
address in one face cannot take the others down.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Callable

import torch

import fastpeft
from fastpeft import backends
from fastpeft.nn import Linear4bit, MultiLoRALinear, PHMLinear
from fastpeft.ops.adapter_block import adapter_block
from fastpeft.testing import assert_close, full_precision_reductions

FACES = ("triton", "cuda", "cpu")


def _randn(*shape, device, dtype, grad=False, scale=1.0):
    t = (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def lora_case(M, K, N, r):
    def run(device, dtype):
        x = _randn(M, K, device=device, dtype=dtype, grad=True)
        w, bias = _randn(N, K, device=device, dtype=dtype, scale=K ** -0.5), _randn(N, device=device, dtype=dtype)
        a = _randn(r, K, device=device, dtype=dtype, grad=True, scale=K ** -0.5)
        b = _randn(N, r, device=device, dtype=dtype, grad=True, scale=r ** -0.5)
        dy = _randn(M, N, device=device, dtype=dtype)

        def call():
            for t in (x, a, b):
                t.grad = None
            y = fastpeft.ops.lora_linear(x, w, bias, a, b, 0.5)
            y.backward(dy)
            return [y, x.grad, a.grad, b.grad]
        return call
    return f"M={M} K={K} N={N} r={r}", run


def dora_case(M, K, N, r):
    def run(device, dtype):
        x = _randn(M, K, device=device, dtype=dtype, grad=True)
        w, bias = _randn(N, K, device=device, dtype=dtype, scale=K ** -0.5), _randn(N, device=device, dtype=dtype)
        a = _randn(r, K, device=device, dtype=dtype, grad=True, scale=K ** -0.5)
        b = _randn(N, r, device=device, dtype=dtype, grad=True, scale=r ** -0.5)
        m = (w.float().norm(dim=1) * (0.5 + torch.rand(N, device=device))).to(dtype).requires_grad_()
        dy = _randn(M, N, device=device, dtype=dtype)

        def call():
            for t in (x, a, b, m):
                t.grad = None
            y = fastpeft.ops.dora_linear(x, w, bias, a, b, m, 0.5)
            y.backward(dy)
            return [y, x.grad, a.grad, b.grad, m.grad]
        return call
    return f"M={M} K={K} N={N} r={r}", run


def nf4_case(M, K, N, transposed=False):
    def run(device, dtype):
        q = Linear4bit.from_linear(torch.nn.Linear(K, N), 64, double_quant=True).to(device).q
        x = _randn(M, N if transposed else K, device=device, dtype=dtype)
        extra = dict(nested_absmax=q.nested_absmax, nested_quant_map=q.nested_quant_map, absmax_offset=q.offset)
        return lambda: [fastpeft.ops.nf4_matmul(x, q.packed, q.absmax, q.quant_map, 64, N, None, transposed,
                                                **extra)]
    return f"M={M} K={K} N={N}{' transposed' if transposed else ''}", run


def multi_lora_case(T, K, N, r, U):
    def run(device, dtype):
        layer = MultiLoRALinear(torch.nn.Linear(K, N, bias=False), max_adapters=U, max_rank=r).to(device, dtype)
        for u in range(U):
            layer.set_adapter(u, torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5, 2.0)
        x = _randn(T, K, device=device, dtype=dtype)
        ids = (torch.arange(T) % U).to(device)
        return lambda: [layer(x, ids)]
    return f"T={T} K={K} N={N} r={r} U={U}", run


def phm_case(M, K, N, n, rank):
    def run(device, dtype):
        layer = PHMLinear(K, N, n, phm_rank=rank).to(device, dtype)
        x = _randn(M, K, device=device, dtype=dtype, grad=True)
        dy = _randn(M, N, device=device, dtype=dtype)

        def call():
            x.grad = None
            layer.zero_grad()
            y = layer(x)
            y.backward(dy)
            return [y, x.grad] + [p.grad for p in layer.parameters()]
        return call
    return f"M={M} K={K} N={N} n={n} rank={rank}", run


def dense_case(M, K, N):
    def run(device, dtype):
        x = _randn(M, K, device=device, dtype=dtype)
        w, bias = _randn(N, K, device=device, dtype=dtype, scale=K ** -0.5), _randn(N, device=device, dtype=dtype)
        return lambda: [fastpeft.ops.dense_linear(x, w, bias)]
    return f"M={M} K={K} N={N}", run


def adapter_block_case(M, D, R):
    def run(device, dtype):
        x = _randn(M, D, device=device, dtype=dtype, grad=True)
        weights = [_randn(R, D, device=device, dtype=dtype, grad=True, scale=D ** -0.5),
                   _randn(R, device=device, dtype=dtype, grad=True),
                   _randn(D, R, device=device, dtype=dtype, grad=True, scale=R ** -0.5),
                   _randn(D, device=device, dtype=dtype, grad=True)]
        dy = _randn(M, D, device=device, dtype=dtype)

        def call():
            for t in (x, *weights):
                t.grad = None
            y = adapter_block(x, x, *weights, 0.5, "gelu")
            y.backward(dy)
            return [y, x.grad] + [w.grad for w in weights]
        return call
    return f"M={M} D={D} R={R}", run


def cases(op: str, quick: bool) -> list[tuple[str, Callable]]:
    """(name, run(device, dtype) -> call() -> tensors) per case: a ragged one, then the bench's."""
    ragged = {"lora_linear": [lora_case(5, 70, 33, 3)], "dora_linear": [dora_case(5, 70, 33, 3)],
              "nf4_matmul": [nf4_case(3, 192, 33), nf4_case(3, 192, 33, True)],
              "multi_lora": [multi_lora_case(9, 96, 40, 4, 3)], "phm_linear": [phm_case(7, 48, 24, 4, 1)],
              "adapter_block": [adapter_block_case(9, 40, 6)], "dense_linear": [dense_case(3, 70, 33)]}[op]
    if quick:
        return ragged
    bench = {"lora_linear": [lora_case(16, 4096, 4096, 16), lora_case(4096, 4096, 4096, 16)],
             "dora_linear": [dora_case(256, 4096, 4096, 16), dora_case(4096, 4096, 4096, 16)],
             "nf4_matmul": [nf4_case(1, 4096, 14336), nf4_case(16, 4096, 14336), nf4_case(512, 4096, 14336),
                            nf4_case(512, 4096, 14336, True)],
             "multi_lora": [multi_lora_case(64, 4096, 4096, 16, 8), multi_lora_case(512, 4096, 4096, 16, 8)],
             "phm_linear": [phm_case(4096, 4096, 4096, 8, 1), phm_case(4096, 4096, 4096, 8, None)],
             "adapter_block": [adapter_block_case(4096, 4096, 64), adapter_block_case(4096, 4096, 256)],
             "dense_linear": [dense_case(1, 576, 49152), dense_case(4, 576, 49152)]}[op]
    return ragged + bench


def _time_ms(call, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def check(op: str, device: str, dtypes, quick: bool, out, wanted=FACES) -> int:
    """Run the usable fast faces of `op` (of `wanted`) against the reference; one JSON line each;
    returns the number of failures."""
    faces = [f for f in wanted if backends.availability(f, torch.device(device)).usable]
    failures = 0
    for name, run in cases(op, quick):
        for dtype in dtypes:
            torch.manual_seed(0)
            try:
                call = run(device, dtype)
                with fastpeft.use_backend("torch"):
                    expected = [t.detach().clone() for t in call()]
            except Exception as e:  # the case itself cannot be built or the reference fails: say so, go on
                out.write(json.dumps(dict(op=op, case=name, dtype=str(dtype).removeprefix("torch."), face="torch",
                                          device=device, ok=False, error=f"{type(e).__name__}: {e}")) + "\n")
                failures += 1
                continue
            for face in faces:
                record = dict(op=op, case=name, dtype=str(dtype).removeprefix("torch."), face=face, device=device)
                try:
                    with fastpeft.use_backend(face):
                        call()  # the first call compiles
                        record["ms"] = _time_ms(call, device)
                        got = call()
                    worst = max(((g.float() - e.float()).abs().max() / e.float().abs().max().clamp(min=1)).item()
                                for g, e in zip(got, expected))
                    record["max_rel_err"] = worst
                    for g, e in zip(got, expected):
                        assert_close(g, e, dtype)
                    record["ok"] = True
                except backends.BackendUnavailable as e:
                    record.update(ok=None, error=f"not run: {e}")
                except Exception as e:  # a mismatch or a crash: the record says which, the run goes on
                    record.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                  where=traceback.format_exc(limit=-3))
                    failures += 1
                out.write(json.dumps(record) + "\n")
                out.flush()
    return failures


OPS = ("lora_linear", "dora_linear", "nf4_matmul", "multi_lora", "phm_linear", "adapter_block", "dense_linear")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--op", action="append", choices=OPS, help="default: every op")
    parser.add_argument("--face", action="append", choices=FACES, help="default: every usable fast face")
    parser.add_argument("--quick", action="store_true", help="the ragged cases only (the CPU stand-in)")
    parser.add_argument("--jsonl", default="-", help="append the records here (default: stdout)")
    args = parser.parse_args(argv)
    full_precision_reductions()
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    out = sys.stdout if args.jsonl == "-" else open(args.jsonl, "a")
    try:
        failures = [check(op, args.device, dtypes, args.quick, out, tuple(args.face or FACES)) for op in args.op or OPS]
        return 1 if sum(failures) else 0
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
