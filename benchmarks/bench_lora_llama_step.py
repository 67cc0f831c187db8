"""End-to-end LoRA training step on a Llama-style decoder stack: lowrank against HF PEFT on the
same model, in tokens/s and peak memory, measured in one run.

    python -m benchmarks.bench_lora_llama_step                 # default config for the device
    python -m benchmarks.bench_lora_llama_step --quick         # a tiny model: a smoke test
    python -m benchmarks.bench_lora_llama_step --device cuda --layers 4 --batch 4 --seq 2048

The model is transformers' LlamaModel built from a LlamaConfig with Llama-3-8B's block (hidden
4096, intermediate 14336, 32 heads, 8 KV heads) and --layers of them, random weights, bf16 on
CUDA (fp32 on CPU). LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down_proj. Providers:
  hf_peft            peft.get_peft_model with a LoraConfig (adapters kept in the model's dtype)
  lowrank_<backend>  lowrank.inject_lora with that backend (auto: the fastest, measured per shape)
A step: the stack on random input embeddings [batch, seq, hidden], loss = mean of the last
hidden state squared (in fp32), backward, AdamW on the adapter parameters. Every provider starts
from the same base weights and the same nonzero A and B, and must give hf_peft's loss and
adapter gradients before it is timed. Steps alternate between providers. Per provider: median
ms per step, tokens/s, and peak memory (CUDA) above the model's own.
Results: <out-dir>/lora_llama_step_<device-slug>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Optional

import torch
from torch import nn

import lowrank
from benchmarks.harness import backend_skip_reasons, markdown_document, positive_int, publish
from benchmarks.training_step import TrainingRun, compare_providers, markdown_rows, start_report, step_parser

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
LOWRANK_BACKENDS = ("triton", "cuda", "auto")
BASELINE = "hf_peft"
# Llama-3-8B's block; --quick swaps in a tiny one.
FULL_MODEL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
DEFAULTS = {"cpu": dict(layers=2, batch=1, seq=256, repeats=5, warmup=1),
            "cuda": dict(layers=4, batch=4, seq=2048, repeats=20, warmup=3)}
QUICK = dict(layers=2, batch=2, seq=16, repeats=2, warmup=1)


def base_model(layers: int, device: torch.device, dtype: torch.dtype, quick: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**(QUICK_MODEL if quick else FULL_MODEL), num_hidden_layers=layers, vocab_size=256,
                         max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaModel(config).to(device=device, dtype=dtype).requires_grad_(False)


def adapter_values(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded nonzero (A [r, in], B [out, r]) per target module, so no provider can skip B·A."""
    generator = torch.Generator().manual_seed(1)
    values = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            out_features, in_features = module.weight.shape
            lora_A = torch.randn(RANK, in_features, generator=generator) * in_features**-0.5
            lora_B = torch.randn(out_features, RANK, generator=generator) * RANK**-0.5
            values[name] = (lora_A.to(module.weight), lora_B.to(module.weight))
    return values


def hidden_state_loss(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds).last_hidden_state.float().square().mean()


def _with_values(trained: dict[str, torch.Tensor], values: dict) -> dict[str, torch.Tensor]:
    """Copy the shared adapter values into the named tensors."""
    with torch.no_grad():
        for name, (lora_A, lora_B) in values.items():
            trained[f"{name}.lora_A"].copy_(lora_A)
            trained[f"{name}.lora_B"].copy_(lora_B)
    return trained


def build_hf_peft(model: nn.Module, values: dict) -> TrainingRun:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    layers = {name: wrapped.base_model.model.get_submodule(name) for name in values}
    trained = {f"{name}.{which}": getattr(layer, which)["default"].weight
               for name, layer in layers.items() for which in ("lora_A", "lora_B")}
    return TrainingRun(wrapped, _with_values(trained, values), hidden_state_loss)


def build_lowrank(backend: str):
    def build(model: nn.Module, values: dict) -> TrainingRun:
        lowrank.inject_lora(model, TARGETS, r=RANK, alpha=ALPHA, dropout=0.0, backend=backend)
        lowrank.mark_only_lora_trainable(model)
        trained = {f"{name}.{which}": getattr(model.get_submodule(name), which)
                   for name in values for which in ("lora_A", "lora_B")}
        return TrainingRun(model, _with_values(trained, values), hidden_state_loss)

    return build


BUILDERS = {BASELINE: build_hf_peft, **{f"lowrank_{backend}": build_lowrank(backend) for backend in LOWRANK_BACKENDS}}
PROVIDERS = tuple(BUILDERS)


def skip_reasons(device: torch.device) -> dict[str, str]:
    import importlib.util

    reasons = {}
    for name in ("transformers", "peft"):
        if importlib.util.find_spec(name) is None:
            reasons.update({provider: f"{name} is not installed" for provider in PROVIDERS})
    for provider in PROVIDERS:
        if provider != BASELINE and provider in backend_skip_reasons(device):
            reasons.setdefault(provider, backend_skip_reasons(device)[provider])
    return reasons


def run_benchmark(args: argparse.Namespace) -> dict:
    device, dtype, settings, providers, report = start_report(
        "lora_llama_step", args, DEFAULTS, QUICK, skip_reasons, BASELINE,
        model=dict(QUICK_MODEL if args.quick else FULL_MODEL), lora={"r": RANK, "alpha": ALPHA, "dropout": 0.0,
                                                                     "targets": TARGETS})
    report["model"]["layers"] = settings["layers"]
    if report["failed_checks"]:
        return report

    model = base_model(settings["layers"], device, dtype, args.quick)
    values = adapter_values(model)
    generator = torch.Generator(device=device).manual_seed(2)
    hidden = model.config.hidden_size
    embeds = torch.randn(settings["batch"], settings["seq"], hidden, generator=generator, device=device).to(dtype)
    report["results"], report["failed_checks"] = compare_providers(
        lambda provider: BUILDERS[provider](copy.deepcopy(model), values), providers, BASELINE, embeds, dtype, device,
        settings["warmup"], settings["repeats"], settings["batch"] * settings["seq"])
    return report


def markdown_report(report: dict) -> str:
    model = report["model"]
    context = (
        f"{model['layers']} layers of hidden {model['hidden_size']}, intermediate {model['intermediate_size']}, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} KV); batch {report['batch']} × seq "
        f"{report['seq']}; {report['dtype']}; LoRA r={RANK} on {', '.join(TARGETS)}. Median of {report['repeats']} "
        f"steps after {report['warmup']} warm-up, providers alternating."
    )
    table = "\n".join(markdown_rows(report["results"], BASELINE))
    return markdown_document(report, "LoRA training step, Llama-style stack", context, table)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = step_parser("python -m benchmarks.bench_lora_llama_step", __doc__, PROVIDERS)
    parser.add_argument("--layers", type=positive_int)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    markdown = markdown_report(report)
    return publish(report, args.out_dir, f"lora_llama_step_{report['device']['slug']}", markdown, markdown)


if __name__ == "__main__":
    sys.exit(main())
