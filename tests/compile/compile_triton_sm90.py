"""Compile every Triton kernel of lowrank for Hopper (sm_90), in every autotune config that its
search space may time, without a GPU, and check what the GPU would run.

The kernels are reached through their real host code (lowrank.kernels.*) with CPU tensors of
realistic shapes, so each launch is specialised exactly as on a GPU (16-divisible ints and
pointers, ints equal to 1 as constants) and the autotuner's own pruning picks the configs.
A compile-only Triton driver stands in for the GPU: every launch compiles and none runs.

Each compiled kernel is checked: it compiles, uses at most sm_90's shared memory, does not
spill, and a bf16/fp16 tile of 64 or more rows runs on wgmma. Registers, spills and shared
memory come from the cubin (cuobjdump). Exit status 1 on any failure.

  python tests/compile/compile_triton_sm90.py [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

SM90_MAX_SHARED_BYTES = 232448  # 227 KiB of dynamic shared memory per block
HALF_DTYPES = (torch.float16, torch.bfloat16)
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
IGNORED_KEYS = {"debug", "instrumentation_mode", "num_ctas", "maxnreg", "ACC_DTYPE"}


class CompileOnlyDriver:
    """The slice of Triton's active-driver interface that compiling a launch touches."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Replaces launching with compiling: JITFunction.run compiles (warmup) and records;
    Autotuner.run compiles every config that its pruning keeps, instead of timing them."""

    def __init__(self):
        self.compiled = []
        self.scenario = ""

    def install(self):
        recorder = self
        jit_run = JITFunction.run

        def compile_launch(fn, *args, grid, warmup, **kwargs):
            options = {key: getattr(value, "value", value) for key, value in kwargs.items() if key not in IGNORED_KEYS}
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            dtype = next(arg.dtype for arg in args if isinstance(arg, torch.Tensor))
            recorder.compiled.append((recorder.scenario, fn.fn.__name__, dtype, options, kernel))
            return kernel

        def compile_every_config(tuner, *args, grid, warmup, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            tuner.nargs = None
            for config in configs:
                tuner.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())

        JITFunction.run = compile_launch
        Autotuner.run = compile_every_config
        driver.set_active(CompileOnlyDriver())


def scenarios(quick: bool):
    """(name, thunk) pairs: realistic launches of every kernel through its host code."""
    from lowrank.kernels import adapter, dora_linear, grad_reverse, lora_linear, multi_lora_linear

    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype)

    seed = torch.zeros((), dtype=torch.int64)
    M, K, N, r = (1024, 1024, 1024, 16) if quick else (8192, 4096, 4096, 16)
    # bf16 is the training dtype; fp32 and fp64 take the FMA tiles (the GPU tests run fp64 too).
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32, torch.float64)
    for dtype in dtypes:
        name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
        x, weight, bias = empty(M, K, dtype=dtype), empty(N, K, dtype=dtype), empty(N, dtype=dtype)
        lora_A, lora_B, grad_y = empty(r, K, dtype=dtype), empty(N, r, dtype=dtype), empty(M, N, dtype=dtype)
        xa = empty(M, r, dtype=dtype)
        for p in (0.0, 0.1):
            yield (f"lora train {name} M={M} K=N={K} r={r} p={p}",
                   lambda p=p, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B:
                   lora_linear.forward(x, weight, bias, lora_A, lora_B, 2.0, p, seed))
            yield (f"lora backward {name} M={M} K=N={K} r={r} p={p}",
                   lambda p=p, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, grad_y=grad_y, xa=xa:
                   lora_linear.backward(grad_y, x, xa, weight, lora_A, lora_B, 2.0, p, seed, True, False, False))
        # DoRA: the column-scaled _lora_matmul_kernel, the column sums (recovering z from y, or
        # summing dy⊙z under dropout) and the dropout path's masked add.
        magnitude = empty(N, dtype=dtype)
        norm = empty(N, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for p in (0.0, 0.1):
            yield (f"dora train {name} M={M} K=N={K} r={r} p={p}",
                   lambda p=p, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude,
                   norm=norm: dora_linear.forward(x, weight, bias, lora_A, lora_B, magnitude, norm, 2.0, p, seed))
            yield (f"dora backward {name} M={M} K=N={K} r={r} p={p}",
                   lambda p=p, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, grad_y=grad_y, xa=xa,
                   magnitude=magnitude, norm=norm:
                   dora_linear.backward(grad_y, x, xa, grad_y, weight, bias, lora_A, lora_B, magnitude, norm, 2.0, p,
                                        seed, True, True, True))
        # Mixed adapters: every row a valid adapter, so the host code's grouping passes.
        adapters = 16
        index = torch.arange(M) % adapters
        multi_A, multi_B = empty(adapters, r, K, dtype=dtype), empty(adapters, N, r, dtype=dtype)
        for p in (0.0, 0.1):
            rates = [p] * adapters
            yield (f"multi-lora train {name} M={M} K=N={K} r={r} adapters={adapters} p={p}",
                   lambda rates=rates, x=x, weight=weight, bias=bias, index=index, multi_A=multi_A, multi_B=multi_B:
                   multi_lora_linear.forward(x, weight, bias, index, multi_A, multi_B, [2.0] * adapters, rates, seed))
            yield (f"multi-lora backward {name} M={M} K=N={K} r={r} adapters={adapters} p={p}",
                   lambda rates=rates, x=x, weight=weight, index=index, multi_A=multi_A, multi_B=multi_B, grad_y=grad_y,
                   xa=xa:
                   multi_lora_linear.backward(grad_y, x, xa, weight, index, multi_A, multi_B, [2.0] * adapters, rates,
                                              seed, True, False, False))
    x_weight, x_bias = empty(N, K), empty(N)
    for rows in (16, 256):
        yield (f"lora inference bf16 M={rows} K=N={K} r={r}",
               lambda rows=rows: lora_linear.inference(empty(rows, K), x_weight, x_bias, empty(r, K), empty(N, r), 2.0))

    tokens, dim = (2048, 1024) if quick else (16384, 4096)
    for bottleneck in (16, 64):
        h, grad_out = empty(tokens, dim), empty(tokens, dim)
        w_down, b_down, w_up, b_up = empty(bottleneck, dim), empty(bottleneck), empty(dim, bottleneck), empty(dim)
        z = empty(tokens, bottleneck)
        for activation in ("gelu",) if quick else ("relu", "gelu", "silu"):
            yield (f"adapter forward bf16 tokens={tokens} dim={dim} bottleneck={bottleneck} {activation}",
                   lambda h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, activation=activation:
                   adapter.forward(h, w_down, b_down, w_up, b_up, activation, 1.0, True))
            yield (f"adapter backward bf16 tokens={tokens} dim={dim} bottleneck={bottleneck} {activation}",
                   lambda h=h, grad_out=grad_out, z=z, w_down=w_down, w_up=w_up, activation=activation:
                   adapter.backward(grad_out, h, z, w_down, w_up, activation, 1.0, True, True, True, True, True, True))

    grad = empty(tokens, dim)
    host_lambda = torch.ones((), dtype=torch.float32)
    # The host code reads a CPU lambda on the host; a meta one stands in for a lambda on the GPU.
    yield ("grad_reverse bf16 dense, lambda on the device",
           lambda: grad_reverse._launch(grad, torch.empty_like(grad), torch.ones((), device="meta")))
    yield ("grad_reverse bf16 in place, lambda on host", lambda: grad_reverse.backward_(grad, host_lambda))
    yield (
        "grad_reverse bf16 strided (a transposed slice)",
        lambda: grad_reverse.backward(grad[:, 1:].t(), host_lambda),
    )
    yield ("grad_reverse bf16 expanded (stride 0)",
           lambda: grad_reverse.backward(empty(dim).expand(tokens, dim), host_lambda))


def cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, local memory per thread (spills) and static shared memory of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([cuobjdump(), "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    if usage is None:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{dump}")
    registers, stack, _, local = map(int, usage.groups())
    return {"registers": registers, "spill_bytes": max(stack, local)}


def specialisation(kernel) -> dict[str, str]:
    """How the launch specialised each runtime argument: its type, 'divisible by 16', or the
    constant it became (an int equal to 1)."""
    source = kernel.src
    result = {}
    for index, name in enumerate(source.fn.arg_names):
        kind = source.signature[name]
        if kind == "constexpr":
            value = source.constants.get((index,))
            if isinstance(value, int) and not name.isupper():
                result[name] = f"constexpr {value}"
        else:
            divisible = ["tt.divisibility", 16] in [list(attr) for attr in source.attrs.get((index,), [])]
            result[name] = kind + (", divisible by 16" if divisible else "")
    return result


def describe(options: dict) -> tuple[str, str]:
    """(the variant's constexprs, the tile) of one launch."""
    tile = options.get("BLOCK_M")
    variant = ", ".join(f"{key}={value}" for key, value in sorted(options.items())
                        if key not in TILE_KEYS and key not in ("BLOCK", "DOT_PRECISION") and key.isupper()
                        and not key.endswith("_KEY"))
    if tile is None:
        config = f"BLOCK={options.get('BLOCK')} w{options.get('num_warps')}"
    else:
        tile = "x".join(str(options[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if key in options)
        config = f"{tile} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"
    return variant, config


def check(record) -> dict:
    scenario, kernel_name, dtype, options, kernel = record
    variant, config = describe(options)
    usage = resource_usage(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    wgmma = "wgmma.mma_async" in kernel.asm["ptx"]
    problems = []
    if shared > SM90_MAX_SHARED_BYTES:
        problems.append(f"{shared} B of shared memory (sm_90 has {SM90_MAX_SHARED_BYTES})")
    if usage["spill_bytes"]:
        problems.append(f"spills {usage['spill_bytes']} B per thread")
    if dtype in HALF_DTYPES and options.get("BLOCK_M", 0) >= 64 and not wgmma:
        problems.append("a half-precision tile of >= 64 rows without wgmma")
    return {"scenario": scenario, "kernel": kernel_name, "dtype": str(dtype).removeprefix("torch."),
            "variant": variant, "config": config, "shared_bytes": shared, "wgmma": wgmma, **usage,
            "specialisation": specialisation(kernel), "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every compiled kernel's record here")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, bf16 only (a smoke run)")
    args = parser.parse_args()
    # The host code takes the GPU path (no interpreter) and sizes its grids for an H100/H200.
    import lowrank._backends as backends
    backends.triton_interpret = lambda: False
    backends.multiprocessor_count = lambda device: 132

    recorder = Recorder()
    recorder.install()
    started = time.perf_counter()
    failures, scenario_names = [], []
    for name, launch in scenarios(args.quick):
        scenario_names.append(name)
        recorder.scenario = name
        try:
            launch()
        except Exception as exc:  # a compile error: report it with the launch that hit it
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:2000]}")
    # One record per distinct compiled kernel: the same specialisation and config recur across launches.
    results = list({(r["kernel"], r["dtype"], r["variant"], r["config"], json.dumps(r["specialisation"])): r
                    for r in reversed([check(record) for record in recorder.compiled])}.values())[::-1]
    elapsed = time.perf_counter() - started

    print(f"{'kernel':24s} {'dtype':8s} {'variant':58s} {'largest tile':17s} {'configs':>7s} "
          f"{'max regs':>8s} {'spill B':>7s} {'max smem B':>10s} {'wgmma':>7s}")
    groups = {}
    for result in results:
        groups.setdefault((result["kernel"], result["dtype"], result["variant"]), []).append(result)
    for (kernel_name, dtype, variant), group in sorted(groups.items()):
        largest = max(group, key=lambda result: result["shared_bytes"])
        configs = {r["config"] for r in group}
        on_wgmma = {r["config"] for r in group if r["wgmma"]}
        print(f"{kernel_name:24s} {dtype:8s} {variant:58s} {largest['config']:17s} {len(configs):7d} "
              f"{max(r['registers'] for r in group):8d} {max(r['spill_bytes'] for r in group):7d} "
              f"{max(r['shared_bytes'] for r in group):10d} {len(on_wgmma):3d}/{len(configs):<3d}")
    for result in results:
        for problem in result["problems"]:
            failures.append(f"{result['kernel']} {result['dtype']} {result['variant']} at {result['config']} "
                            f"({result['scenario']}): {problem}")
    print(f"triton {triton.__version__}, sm_90: {len(results)} distinct kernels compiled ({len(groups)} kernel "
          f"variants, {len(recorder.compiled)} launches of {len(scenario_names)} scenarios) in {elapsed:.0f} s; "
          f"{len(failures)} failures")
    for failure in failures:
        print(f"FAIL {failure}")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "kernels": results, "failures": failures},
                                        indent=1))
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
