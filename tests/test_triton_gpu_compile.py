"""Compile the Triton kernels for Hopper (sm_90) without a GPU: Triton's compiler and its bundled
ptxas run on the CPU. The interpreter runs the kernels' logic but not their GPU lowering (tl.dot
dtype rules, wgmma selection); this catches what it cannot."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lowrank.kernels import lora_linear as k

    DTYPE = {"bf16": ("*bf16", tl.float32), "fp32": ("*fp32", tl.float32), "fp64": ("*fp64", tl.float64)}

    def compile_kernel(fn, dtype, tiles, **constexprs):
        pointer, acc = DTYPE[dtype]
        block_m, block_n, block_k, warps, stages = tiles
        constexprs.update(ACC_DTYPE=acc, DOT_PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, GROUP_M=8)
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointer
            elif name in ("lora_scale", "alpha"):
                signature[name] = "fp64"
            else:
                signature[name] = "i32"
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
        out = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": warps, "num_stages": stages})
        return {"wgmma": "wgmma" in out.asm["ptx"], "cubin_bytes": len(out.asm["cubin"])}

    hopper = (128, 128, 64, 8, 3)
    fma = (64, 64, 16, 4, 3)
    results = {
        "lora_matmul_bf16": compile_kernel(k._lora_matmul_kernel, "bf16", hopper, HAS_BIAS=True, DROPOUT=False, BLOCK_R=64),
        "lora_matmul_bf16_dropout": compile_kernel(k._lora_matmul_kernel, "bf16", hopper, HAS_BIAS=False, DROPOUT=True, BLOCK_R=64),
        "lora_matmul_fp32": compile_kernel(k._lora_matmul_kernel, "fp32", fma, HAS_BIAS=True, DROPOUT=False, BLOCK_R=32),
        "matmul_bf16_dropout": compile_kernel(k._matmul_kernel, "bf16", hopper, DROPOUT_A=True, DROPOUT_B=False),
        "matmul_fp64": compile_kernel(k._matmul_kernel, "fp64", (64, 64, 32, 4, 2), DROPOUT_A=False, DROPOUT_B=True),
        "inference_bf16": compile_kernel(k._inference_kernel, "bf16", (64, 128, 64, 4, 3), HAS_BIAS=True, BLOCK_R=64),
    }
    print(json.dumps(results))
    """
)


def test_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["lora_matmul_bf16"]["wgmma"], "the bf16 main kernel should use Hopper's wgmma"
    assert all(result["cubin_bytes"] > 0 for result in results.values())
