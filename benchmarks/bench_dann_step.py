"""DANN training-step benchmark: one full step with lowrank's fused gradient reversal against the
same step with an eager GRL (forward x.clone(), backward allocates −λ·grad), measured in one run.

    python -m benchmarks.bench_dann_step                      # default configs for the device
    python -m benchmarks.bench_dann_step --quick              # tiny batch, few repeats: a smoke test
    python -m benchmarks.bench_dann_step --device cuda --batch 1024 --feature-dim 4096
    python -m benchmarks.bench_dann_step --device cuda --encoder vit-b --batch 256 --repeats 10

The step is lowrank.da's DANN step: LeNet encoder on source+target images (28x28 grey), label
classifier on the source half, FC 500-500-2 domain classifier behind the GRL, cross-entropy
losses, backward, SGD with momentum. `--feature-dim` widens the encoder output (the GRL's
tensor) and the discriminator input. Every provider starts from the same weights and batch and
must give the eager step's gradients before it is timed. Per provider: median ms per step and
the ratio to the eager step (below 1: faster). The GRL is a small part of a LeNet step, so the
ratio is expected near 1; the benchmark shows that the fused op costs nothing extra in a real step.
`--encoder vit-b` puts a ViT-B/16-sized feature extractor (transformers' ViTModel: hidden 768,
12 layers, 12 heads, 224x224 RGB images; its [CLS] output is the GRL's tensor) in place of LeNet;
with --quick, a tiny ViT.
Results: <out-dir>/dann_step_<device-slug>[_vit-b].json and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_grad_reverse import LAMBDA, providers, time_interleaved
from benchmarks.harness import (
    DEFAULT_OUT_DIR,
    format_ms,
    markdown_document,
    positive_int,
    publish,
    report_header,
    report_notes,
    resolve_device,
)
from lowrank.da.models import Classifier, Discriminator, LeNetEncoder

DEFAULT_CONFIGS = {"cpu": [(64, 500), (64, 4096)], "cuda": [(256, 500), (1024, 4096)]}  # (batch per domain, features)
DEFAULT_REPEATS = {"cpu": 15, "cuda": 100}
DEFAULT_WARMUP = {"cpu": 3, "cuda": 10}
QUICK_CONFIG, QUICK_REPEATS, QUICK_WARMUP = (8, 64), 3, 1
VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
             patch_size=16)
VIT_QUICK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)


class ViTFeatures(nn.Module):
    """RGB images [N, 3, S, S] -> the [CLS] token's final hidden state [N, hidden]."""

    def __init__(self, sizes: dict):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.vit = ViTModel(ViTConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      attn_implementation="sdpa"), add_pooling_layer=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=images).last_hidden_state[:, 0]


class _DANNStep:
    """One DANN model and optimiser with a given GRL forward; call step() for one training step."""

    def __init__(self, template: nn.ModuleDict, grl, batch: tuple):
        self.model = copy.deepcopy(template)
        self.grl = grl
        self.batch = batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def losses(self):
        xs, ys, xt = self.batch
        features = self.model["encoder"](torch.cat([xs, xt]))
        class_loss = F.cross_entropy(self.model["classifier"](features[: xs.shape[0]]), ys)
        domains = torch.cat([torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device),
                             torch.ones(xt.shape[0], dtype=torch.long, device=xs.device)])
        domain_loss = F.cross_entropy(self.model["discriminator"](self.grl(features)), domains)
        return class_loss + domain_loss

    def gradients(self) -> list[torch.Tensor]:
        self.model.eval()  # no dropout: providers compared on the same function
        self.optimizer.zero_grad(set_to_none=True)
        self.losses().backward()
        self.model.train()
        return [p.grad.detach().clone() for p in self.model.parameters()]

    def step(self, timer) -> None:
        with timer:
            self.optimizer.zero_grad(set_to_none=True)
            self.losses().backward()
            self.optimizer.step()


def build(batch: int, feature_dim: int, device: torch.device, vit: Optional[dict] = None):
    """The DANN model and a batch; with `vit` (ViTConfig sizes) the encoder is a ViT, whose
    hidden size is then the feature size."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if vit is None:
        encoder, image = LeNetEncoder(1, 28, feature_dim), (1, 28, 28)
    else:
        encoder, image, feature_dim = ViTFeatures(vit), (3, vit["image_size"], vit["image_size"]), vit["hidden_size"]
    template = nn.ModuleDict({"encoder": encoder, "classifier": Classifier(feature_dim),
                              "discriminator": Discriminator(feature_dim)}).to(device)
    xs = torch.randn(batch, *image, generator=generator).to(device)
    xt = torch.randn(batch, *image, generator=generator).to(device)
    ys = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return template, (xs, ys, xt)


def benchmark_config(batch: int, feature_dim: int, forwards: dict, device, repeats: int, warmup: int,
                     vit: Optional[dict] = None):
    template, data = build(batch, feature_dim, device, vit)
    feature_dim = template["classifier"].in_features
    steps = {name: _DANNStep(template, forward, data) for name, forward in forwards.items()}
    reference = steps["naive"].gradients()
    for name, step in steps.items():
        for got, want in zip(step.gradients(), reference):
            torch.testing.assert_close(
                got, want, rtol=1e-4, atol=1e-6, msg=f"{name}: gradients differ from the eager GRL's"
            )
    times = time_interleaved({name: step.step for name, step in steps.items()}, device, repeats, warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    return [{"batch_per_domain": batch, "feature_dim": feature_dim, "provider": name, "median_ms": median[name],
             "times_ms": times[name], "ratio_to_eager": median[name] / median["naive"]} for name in forwards]


def markdown_table(report: dict) -> str:
    lines = ["| batch per domain | features | GRL | step ms | vs eager |", "|---:|---:|---|---:|---:|"]
    for row in report["results"]:
        name = "eager (clone fwd, allocating bwd)" if row["provider"] == "naive" else row["provider"]
        lines.append(f"| {row['batch_per_domain']} | {row['feature_dim']} | {name} | {format_ms(row['median_ms'])} | "
                     f"{row['ratio_to_eager']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dann_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=positive_int, help="images per domain per step (default: per device)")
    parser.add_argument("--feature-dim", type=positive_int, help="LeNet's output size (default: per device)")
    parser.add_argument("--encoder", choices=("lenet", "vit-b"), default="lenet")
    parser.add_argument("--repeats", type=positive_int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--quick", action="store_true", help="one tiny config, few repeats: a smoke test")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.quick:
        configs = [QUICK_CONFIG]
    elif args.batch or args.feature_dim:
        default_batch, default_features = DEFAULT_CONFIGS[device.type][0]
        configs = [(args.batch or default_batch, args.feature_dim or default_features)]
    else:
        configs = DEFAULT_CONFIGS[device.type]
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS[device.type])
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP[device.type])
    forwards, skipped = providers(device)
    report = {**report_header("dann_step", device, "fp32", quick=args.quick, repeats=repeats, warmup=warmup),
              "lambda": LAMBDA, "skipped": skipped, "results": []}
    vit = None if args.encoder == "lenet" else (VIT_QUICK if args.quick else VIT_B)
    report["encoder"] = args.encoder if vit is None else {"name": args.encoder, **vit}
    for batch, feature_dim in configs:
        print(f"batch {batch} x 2 domains, {args.encoder}: timing {', '.join(forwards)}", file=sys.stderr, flush=True)
        report["results"] += benchmark_config(batch, feature_dim, forwards, device, repeats, warmup, vit)
    context = (f"{args.encoder} encoder, fp32, torch {report['versions']['torch']}; "
               f"median of {repeats} steps after {warmup} warm-up, providers interleaved.")
    markdown = markdown_document(report, "DANN training step", context, markdown_table(report))
    name = "_".join(["dann_step", report["device"]["slug"]] + ([args.encoder] if vit else []))
    return publish(report, args.out_dir, name, markdown, "\n".join([markdown_table(report), *report_notes(report)]))


if __name__ == "__main__":
    sys.exit(main())
