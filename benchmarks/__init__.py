"""Benchmarks for lowrank kernels: run them as modules from the repo root (python -m benchmarks.bench_lora_linear)."""
