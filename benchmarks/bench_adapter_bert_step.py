"""End-to-end adapter fine-tuning step on a BERT-base-sized model: lowrank's fused adapters
against eager adapters injected at the same places, in tokens/s and peak memory, in one run.

    python -m benchmarks.bench_adapter_bert_step                  # default config for the device
    python -m benchmarks.bench_adapter_bert_step --quick          # a tiny model: a smoke test
    python -m benchmarks.bench_adapter_bert_step --placement pfeiffer --batch 32 --seq 512

The model is transformers' BertModel built from a BertConfig of BERT-base's size (hidden 768,
12 layers, 12 heads, intermediate 3072), random weights, bf16 on CUDA (fp32 on CPU), frozen.
lowrank.inject_bottleneck puts bottleneck-64 relu adapters at the --placement (Houlsby: after the
attention and the feed-forward sublayers; Pfeiffer: after the feed-forward one), Houlsby's
near-identity init (so every adapter weight gets a gradient on the first step). Providers:
  eager              the same adapters, each computed as nn.Sequential would: F.linear, the
                     activation, F.linear and the residual add, each its own autograd node
  lowrank_<backend>  the fused op lowrank.ops.adapter with that backend (auto: measured per shape)
A step: the model on random token ids [batch, seq], loss = mean of the last hidden state
squared (in fp32), backward, AdamW on the adapter parameters. Every provider starts from the
same weights and must give the eager loss and adapter gradients before it is timed.
Results: <out-dir>/adapter_bert_step_<device-slug>_<placement>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from benchmarks.harness import backend_skip_reasons, markdown_document, publish
from benchmarks.training_step import TrainingRun, compare_providers, markdown_rows, start_report, step_parser
from lowrank.nn.adapter import Adapter
from lowrank.ops.adapter import activation_fn
from lowrank.tuners.bottleneck.model import bottleneck_adapters

BOTTLENECK, ACTIVATION = 64, "relu"
BASELINE = "eager"
LOWRANK_BACKENDS = ("triton", "cuda", "auto")
FULL_MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
QUICK_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
DEFAULTS = {"cpu": dict(batch=2, seq=128, repeats=5, warmup=1), "cuda": dict(batch=32, seq=512, repeats=20, warmup=3)}
QUICK = dict(batch=2, seq=16, repeats=2, warmup=1)


class EagerAdapter(Adapter):
    """The same adapter computed unfused, as an nn.Sequential adapter is (same parameters and hooks)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = F.linear(activation_fn(self.activation)(F.linear(h, self.down.weight, self.down.bias)),
                         self.up.weight, self.up.bias)
        return h + self.scaling * delta


def base_model(device: torch.device, dtype: torch.dtype, quick: bool) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(**(QUICK_MODEL if quick else FULL_MODEL), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).requires_grad_(False)


def hidden_state_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).last_hidden_state.float().square().mean()


def builder(backend: str, eager: bool = False):
    def build(model: nn.Module, placement: str) -> TrainingRun:
        torch.manual_seed(1)  # the same adapter init for every provider
        config = lowrank.BottleneckConfig(placement=placement, bottleneck=BOTTLENECK, activation=ACTIVATION,
                                       init="houlsby", backend=backend)
        lowrank.inject_bottleneck(model, config)
        lowrank.mark_only_bottleneck_trainable(model)
        if eager:
            for adapter in bottleneck_adapters(model).values():
                adapter.__class__ = EagerAdapter
        trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
        return TrainingRun(model, trained, hidden_state_loss)

    return build


BUILDERS = {BASELINE: builder("torch", eager=True),
            **{f"lowrank_{backend}": builder(backend) for backend in LOWRANK_BACKENDS}}
PROVIDERS = tuple(BUILDERS)


def skip_reasons(device: torch.device) -> dict[str, str]:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return {provider: "transformers is not installed" for provider in PROVIDERS}
    reasons = backend_skip_reasons(device)
    return {provider: reasons[provider] for provider in PROVIDERS if provider in reasons}


def run_benchmark(args: argparse.Namespace) -> dict:
    device, dtype, settings, providers, report = start_report(
        "adapter_bert_step", args, DEFAULTS, QUICK, skip_reasons, BASELINE,
        model=QUICK_MODEL if args.quick else FULL_MODEL,
        adapters={"placement": args.placement, "bottleneck": BOTTLENECK, "activation": ACTIVATION})
    if report["failed_checks"]:
        return report
    model = base_model(device, dtype, args.quick)
    generator = torch.Generator(device=device).manual_seed(2)
    input_ids = torch.randint(0, model.config.vocab_size, (settings["batch"], settings["seq"]), generator=generator,
                              device=device)
    report["results"], report["failed_checks"] = compare_providers(
        lambda provider: BUILDERS[provider](copy.deepcopy(model), args.placement),
        providers,
        BASELINE,
        input_ids,
        dtype,
        device,
        settings["warmup"],
        settings["repeats"],
        settings["batch"] * settings["seq"],
    )
    return report


def markdown_report(report: dict) -> str:
    model, adapters = report["model"], report["adapters"]
    context = (
        f"{model['num_hidden_layers']} layers of hidden {model['hidden_size']}; batch {report['batch']} × seq "
        f"{report['seq']}; {report['dtype']}; {adapters['placement']} adapters, bottleneck {adapters['bottleneck']}, "
        f"{adapters['activation']}. Median of {report['repeats']} steps after {report['warmup']} warm-up, providers "
        "alternating."
    )
    table = "\n".join(markdown_rows(report["results"], BASELINE))
    return markdown_document(report, "Adapter fine-tuning step, BERT-base-sized model", context, table)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = step_parser("python -m benchmarks.bench_adapter_bert_step", __doc__, PROVIDERS)
    parser.add_argument("--placement", choices=("houlsby", "pfeiffer"), default="houlsby")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    markdown = markdown_report(report)
    return publish(report, args.out_dir, f"adapter_bert_step_{report['device']['slug']}_{args.placement}", markdown,
                   markdown)


if __name__ == "__main__":
    sys.exit(main())
