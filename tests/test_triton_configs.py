"""The Triton launches as the GPU compiles them, checked here without one (issue 15, items 2 and 4):

* fastpeft.kernels.aot specialises a launch as Triton's JIT does (an integer equal to 1 becomes a
  constant, divisibility and alignment by 16 become ``tt.divisibility``; a misaligned pointer does
  not);
* the tile choosers pick, for a 99 KiB part (sm_86, sm_89), tiles whose compiled shared memory fits,
  and for sm_80/sm_90 tiles that fit theirs;
* the static model reads a cubin (registers, spills, the main loop).

Compiling needs the real @triton.jit kernels, which the interpreter (TRITON_INTERPRET=1, the
tests' default) replaces, so the checks run in a child process without it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

CHILD = textwrap.dedent('''
    import torch
    from fastpeft.kernels import aot, lora_linear, nf4_matmul
    from fastpeft.bench import static

    meta = dict(device="meta")

    def nf4_launches(M, dtype, transposed=False, lora=False, K=4096, N=14336):
        x = torch.empty(M, N if transposed else K, dtype=dtype, **meta)
        w = (torch.empty(N * K // 2, 1, dtype=torch.uint8, **meta), torch.empty(N * K // 64, dtype=torch.uint8, **meta),
             torch.empty(16, **meta))
        nested = dict(nested_absmax=torch.empty(N * K // 64 // 256, **meta), nested_quant_map=torch.empty(256, **meta))
        extra = dict(lora_s=torch.empty(M, 16, dtype=dtype, **meta), lora_l=torch.empty(16, K if transposed else N,
                     dtype=dtype, **meta)) if lora else {}
        with aot.record_launches() as launches:
            nf4_matmul.nf4_matmul(x, *w, 64, N, transposed=transposed, **nested, **extra)
        return launches

    def lora_launches(M, dtype, r, K=4096, N=4096):
        x, w = torch.empty(M, K, dtype=dtype, **meta), torch.empty(N, K, dtype=dtype, **meta)
        a, b = torch.empty(r, K, dtype=dtype, **meta), torch.empty(N, r, dtype=dtype, **meta)
        with aot.record_launches() as launches:
            _, s = lora_linear.lora_linear_fwd(x, w, None, a, b, 2.0)
            lora_linear.lora_linear_bwd(torch.empty(M, N, dtype=dtype, **meta), x, w, a, b, s, 2.0)
        return launches

    def fused_shrink_launches(M, dtype, r, N=4096, K=4096):
        x, w = torch.empty(M, K, dtype=dtype, **meta), torch.empty(N, K, dtype=dtype, **meta)
        a, b = torch.empty(r, K, dtype=dtype, **meta), torch.empty(N, r, dtype=dtype, **meta)
        with aot.record_launches() as launches:
            lora_linear.fused_shrink_matmul(x, w, None, a, b, 2.0)
        return launches

    # 1. the JIT's specialisation
    (launch,) = nf4_launches(1, torch.bfloat16)   # decode: the GEMV, split in two for 14336 rows
    spec = aot.jit_spec(launch, 90)
    consts, attrs = dict(spec.constexprs), dict(spec.attrs)
    assert launch.name == "_nf4_gemv_kernel" and consts["SPLIT"] == 2, spec
    assert consts["M"] == 1 and consts["stride_xk"] == 1 and consts["stride_yn"] == 1, spec
    assert "K_PART" in attrs and "PART_BYTES" in attrs and "packed_ptr" in attrs and "M" not in attrs, spec
    (launch,) = nf4_launches(17, torch.bfloat16)  # the tiled kernel above 16 rows
    spec = aot.jit_spec(launch, 90)
    consts, attrs = dict(spec.constexprs), dict(spec.attrs)
    assert launch.name == "_nf4_matmul_kernel" and consts["stride_xk"] == 1 and consts["stride_yn"] == 1, spec
    assert "K_RED" in attrs and "x_ptr" in attrs and "packed_ptr" in attrs and "M" not in attrs, spec
    buf = torch.empty(16 * 4097, dtype=torch.bfloat16, **meta)
    with aot.record_launches() as launches:
        lora_linear.shrink(buf[1:1 + 16 * 4096].view(16, 4096), torch.empty(16, 4096, dtype=torch.bfloat16, **meta))
    assert "x_ptr" not in dict(aot.jit_spec(launches[0], 90).attrs), "a pointer 2 bytes off 16 is not aligned"

    # 2. tiles within each architecture's shared memory per block
    checked = 0
    for arch in (86, 89, 80, 90):
        limit = aot.SMEM_PER_BLOCK_OPTIN[arch]
        with aot.target_arch(arch):
            launches = (nf4_launches(16, torch.bfloat16) + nf4_launches(16, torch.float32, lora=True, N=4096)
                        + nf4_launches(512, torch.bfloat16, transposed=True, lora=True)
                        + lora_launches(4096, torch.bfloat16, 64))
            if arch == 86:
                launches += nf4_launches(512, torch.float32) + lora_launches(4096, torch.bfloat16, 16)
                assert nf4_matmul.tile(torch.device("cuda"))[2] == 32
                assert lora_linear.matmul_tile(4096, torch.bfloat16, torch.device("cuda"), 64) == "large_99k"
            if arch == 90:
                assert lora_linear.matmul_tile(4096, torch.bfloat16, torch.device("cuda"), 64) == "large"
            # the fused-shrink kernel at every rank block, the large tile and a smaller one (M = 1024)
            launches += [launch for r in (16, 32, 64) for M in (4096, 1024)
                         for launch in fused_shrink_launches(M, torch.bfloat16, r)]
        for launch in launches:
            shared, sass, usage = static.compile_and_read(aot.jit_spec(launch, arch), arch)
            assert shared <= limit, (arch, launch.name, dict(aot.jit_spec(launch, arch).constexprs), shared, limit)
            assert usage["REG"] > 0 and sass.instructions > 0
            if launch.name == "_fused_shrink_matmul_kernel" and not (arch < 90 and
                                                                     dict(launch.kwargs)["BLOCK_R"] == 64):
                # no spill, not even to the stack (the tile rule keeps the 128x256 tile off sm_8x),
                # except sm_8x at BLOCK_R 64, which the mode rule never takes
                assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, dict(launch.kwargs), usage)
            checked += 1
    print("checked", checked)
''')


def test_launches_compile_as_the_jit_does_within_each_architectures_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "checked" in done.stdout


SASS = """
        Function : _Z6kernelIfLi1EEvv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.NA.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0030*/                   LDS.64 R12, [R10] ;
        /*0040*/                   FFMA R0, R12, R4, R0 ;
        /*0050*/                   IMAD R2, R3, 0x10, R2 ;
        /*0060*/              @P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
        Function : _Z6kernelIfLi16EEvv
        /*0000*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
        /*0010*/                   EXIT ;
"""


def test_main_loop_of_a_listing_counts_streamed_loads_apart():
    """The static model's SASS reading (no compiler needed): a function picked by its mangled name,
    the loop found from its backward branch, 16-byte loads counted, the L1::no_allocate ones apart."""
    from fastpeft.bench import static
    loop = static.main_loop(static._section(SASS, r"Function : (\S+)", r"kernelIfLi1E"))
    assert (loop.instructions, loop.ldg_bytes, loop.streaming_bytes, loop.ldg_ops, loop.int_ops) == (6, 32, 16, 2, 1)
    assert static.main_loop(static._section(SASS, r"Function : (\S+)", r"kernelIfLi16E")).instructions == 0
    with pytest.raises(LookupError, match="no function matching"):
        static._section(SASS, r"Function : (\S+)", "other")
