"""Real-data comparison of the fine-tuning strategies: pre-train on MNIST, transfer with 10 labels per class.

    python -m lowrank.finetune.bench                 # the default run: 3 seeds, both models, both targets
    python -m lowrank.finetune.bench --quick         # tiny sizes and 1 epoch: a smoke test, not a result
    python -m lowrank.finetune.bench --select-lr     # re-derive LEARNING_RATES (cross-validation, below)

Protocol. A SmallCNN and a SmallViT (lowrank.finetune.models; 28x28, 3 channels so that MNIST-M's
colour reaches the model, grey images repeated) are pre-trained once (seed 0) on 4500 images of
mnist_5k, with 500 held out as the source validation set. Each seed then draws 10 labelled
images per class of the target and fine-tunes a copy of the pre-trained model with every strategy:
    USPS      10/class of USPS train, evaluated on the USPS test split (2007)
    MNIST-M   10/class of a pool of the MNIST-M test file, evaluated on a disjoint 3000 of it
              (the same fixed split as lowrank.da's mnist-mnistm task)
Multi-stage runs MNIST -> MNIST-M -> USPS (a stage per target, 10/class each, with the same
strategy; LoRA merges after a stage and starts a new adapter), evaluated on USPS test, against the
single-stage MNIST -> USPS run of the same strategy.

Fixed choices (not tuned on any test split): pre-training recipe chosen on source-validation
accuracy; every transfer trains 30 epochs of batch 20 with AdamW, a cosine schedule and the same
random-affine augmentation; the prediction head is the pre-trained one (same 10 classes) and
trains with every strategy. Each strategy's learning rate comes from LEARNING_RATES, which
--select-lr derives: for each (model, strategy, target), 2-fold cross-validation on seed 0's 100
labelled target images over LR_GRID, best mean held-out-fold accuracy (ties: the smaller rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from lowrank._machine import cpu_model, default_results_dir
from lowrank.data import DigitArrays, DigitDataset, load_digits, sample_per_class, split_indices, target_pool_eval_split
from lowrank.data.augment import RandomAffine
from lowrank.finetune import Adapters, FeatureExtraction, FullFineTuning, LoRA, PrefixTuning, PromptTuning, Strategy
from lowrank.finetune.models import SmallCNN, SmallViT
from lowrank.finetune.multistage import FINAL, MultiStage, Stage
from lowrank.finetune.trainer import TrainConfig, Trainer, load_state

IMAGE_SIZE, CHANNELS, PER_CLASS = 28, 3, 10
SOURCE_VAL_SIZE = 500
MNISTM_EVAL_SIZE = 3000
TARGETS = ("usps", "mnist_m")
TARGET_NAMES = {"usps": "USPS", "mnist_m": "MNIST-M"}

ARCHITECTURES = {"cnn": SmallCNN, "vit": SmallViT}
PRETRAIN = {  # chosen on source-validation accuracy
    "cnn": TrainConfig(epochs=8, batch_size=64, lr=1e-3, weight_decay=0.05, scheduler="cosine"),
    "vit": TrainConfig(epochs=20, batch_size=64, lr=2e-3, weight_decay=0.05, scheduler="cosine"),
}
TRANSFER = TrainConfig(epochs=30, batch_size=20, scheduler="cosine")
# LoRA on the CNN's two convolutions and its hidden Linear (the default targets only Linear layers).
CNN_LORA_TARGETS = r"blocks\.0\.0|blocks\.1\.0|blocks\.2\.1"


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    architectures: tuple[str, ...]
    make: object  # (architecture) -> Strategy, or None: evaluate the pre-trained model as it is


def _lora(r: int):
    return lambda arch: LoRA(r=r, alpha=2 * r, target_modules=CNN_LORA_TARGETS if arch == "cnn" else None)


BOTH, VIT = ("cnn", "vit"), ("vit",)
METHODS = {m.name: m for m in (
    Method("no_adaptation", "no adaptation", BOTH, None),
    Method("feature_extraction", "feature extraction (head only)", BOTH, lambda arch: FeatureExtraction()),
    Method("full_finetuning", "full fine-tuning", BOTH, lambda arch: FullFineTuning(blocks=None)),
    Method("last_block", "last-block fine-tuning", BOTH, lambda arch: FullFineTuning(last_k=1)),
    Method("lora_r4", "LoRA r=4", BOTH, _lora(4)),
    Method("lora_r8", "LoRA r=8", BOTH, _lora(8)),
    Method("houlsby", "Houlsby adapters (16)", VIT, lambda arch: Adapters(placement="houlsby", bottleneck=16)),
    Method("pfeiffer", "Pfeiffer adapters (16)", VIT, lambda arch: Adapters(placement="pfeiffer", bottleneck=16)),
    Method("prompt_tuning", "prompt tuning (8 tokens)", VIT,
           lambda arch: PromptTuning(embeddings="embed", num_virtual_tokens=8)),
    Method("prefix_tuning", "prefix tuning (8 tokens)", VIT, lambda arch: PrefixTuning(num_virtual_tokens=8)),
)}
MULTISTAGE = ("full_finetuning", "lora_r8")  # strategies also run as MNIST -> MNIST-M -> USPS

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
# (architecture, method, target) -> learning rate, from `python -m lowrank.finetune.bench --select-lr`.
LEARNING_RATES: dict[tuple[str, str, str], float] = {
    ('cnn', 'feature_extraction', 'usps'): 0.003,
    ('cnn', 'full_finetuning', 'usps'): 0.001,
    ('cnn', 'last_block', 'usps'): 0.0003,
    ('cnn', 'lora_r4', 'usps'): 0.003,
    ('cnn', 'lora_r8', 'usps'): 0.003,
    ('vit', 'feature_extraction', 'usps'): 0.01,
    ('vit', 'full_finetuning', 'usps'): 0.0003,
    ('vit', 'last_block', 'usps'): 0.001,
    ('vit', 'lora_r4', 'usps'): 0.001,
    ('vit', 'lora_r8', 'usps'): 0.001,
    ('vit', 'houlsby', 'usps'): 0.001,
    ('vit', 'pfeiffer', 'usps'): 0.003,
    ('vit', 'prompt_tuning', 'usps'): 0.03,
    ('vit', 'prefix_tuning', 'usps'): 0.01,
    ('cnn', 'feature_extraction', 'mnist_m'): 0.001,
    ('cnn', 'full_finetuning', 'mnist_m'): 0.0003,
    ('cnn', 'last_block', 'mnist_m'): 0.0003,
    ('cnn', 'lora_r4', 'mnist_m'): 0.003,
    ('cnn', 'lora_r8', 'mnist_m'): 0.001,
    ('vit', 'feature_extraction', 'mnist_m'): 0.003,
    ('vit', 'full_finetuning', 'mnist_m'): 0.0003,
    ('vit', 'last_block', 'mnist_m'): 0.0003,
    ('vit', 'lora_r4', 'mnist_m'): 0.001,
    ('vit', 'lora_r8', 'mnist_m'): 0.003,
    ('vit', 'houlsby', 'mnist_m'): 0.0003,
    ('vit', 'pfeiffer', 'mnist_m'): 0.003,
    ('vit', 'prompt_tuning', 'mnist_m'): 0.003,
    ('vit', 'prefix_tuning', 'mnist_m'): 0.003,
}


# ------------------------------------------------------------------------------------------- data


@dataclass
class TransferData:
    train: Dataset  # 10 labelled images per class, augmented
    test: Dataset


def _dataset(arrays: DigitArrays, augment: bool = False) -> DigitDataset:
    return DigitDataset(arrays, size=IMAGE_SIZE, channels=CHANNELS, transform=RandomAffine() if augment else None)


def load_source(root=None, limit: int | None = None) -> tuple[DigitDataset, DigitDataset]:
    """(train, validation) of mnist_5k: 500 held out, stratified, seed 0; limit trims both (quick runs)."""
    mnist = load_digits("mnist", "train5k", root)
    train, val = split_indices(len(mnist), SOURCE_VAL_SIZE, 0, mnist.labels)
    if limit is not None:
        train, val = train[:: max(1, len(train) // limit)], val[:: max(1, len(val) // limit)]
    return _dataset(mnist.subset(train), augment=True), _dataset(mnist.subset(val))


def _target_pool_and_test(target: str, root) -> tuple[DigitArrays, DigitArrays]:
    if target == "usps":
        return load_digits("usps", "train", root), load_digits("usps", "test", root)
    mnist_m = load_digits("mnist_m", "test", root)
    pool, test = target_pool_eval_split(len(mnist_m), MNISTM_EVAL_SIZE, seed=0)
    return mnist_m.subset(pool), mnist_m.subset(test)


def load_target(target: str, seed: int, root=None, test_limit: int | None = None) -> TransferData:
    """The seed's 10-per-class labelled training images of `target` and its test images."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: expected one of {TARGETS}")
    pool, test = _target_pool_and_test(target, root)
    if test_limit is not None:
        test = test.subset(np.arange(min(test_limit, len(test))))
    return TransferData(_dataset(pool.subset(sample_per_class(pool.labels, PER_CLASS, seed)), augment=True),
                        _dataset(test))


# -------------------------------------------------------------------------------------- training


def pretrain(arch: str, train: Dataset, val: Dataset, config: TrainConfig, progress: bool) -> dict:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch](in_channels=CHANNELS)
    trainer = Trainer(model, FullFineTuning(blocks=None), train, val, replace(config, progress=progress))
    start = time.perf_counter()
    trainer.fit()
    return {"model": model, "seconds": time.perf_counter() - start,
            "source_val_accuracy": trainer.history[-1]["eval_accuracy"]}


def learning_rate(arch: str, method: str, target: str) -> float:
    rate = LEARNING_RATES.get((arch, method, target))
    if rate is None:
        raise ValueError(f"no learning rate for ({arch}, {method}, {target}) in LEARNING_RATES; run --select-lr")
    return rate


def _evaluate(model: nn.Module, test: Dataset, config: TrainConfig) -> float:
    return Trainer(model, Strategy(), test, test, config).evaluate()["eval_accuracy"]


def transfer(pretrained: nn.Module, arch: str, method: str, train: Dataset, test: Dataset, config: TrainConfig,
             lr: float) -> dict:
    """Fine-tune a copy of `pretrained` with `method` on `train`: accuracy on `test`, size and time."""
    model = copy.deepcopy(pretrained)
    if METHODS[method].make is None:
        return {"accuracy": _evaluate(model, test, config), "trainable_parameters": 0, "seconds": 0.0}
    trainer = Trainer(model, METHODS[method].make(arch), train, None, replace(config, lr=lr))
    start = time.perf_counter()
    model = trainer.fit(resume=False)
    seconds = time.perf_counter() - start
    return {"accuracy": _evaluate(model, test, config), "trainable_parameters": trainer.trainable_parameters,
            "seconds": seconds, "lr": lr, "train_accuracy": trainer.history[-1]["train_accuracy"]}


def transfer_in_stages(pretrained: nn.Module, arch: str, method: str, stages: list[tuple[str, Dataset, float]],
                       test: Dataset, config: TrainConfig) -> dict:
    """MultiStage over (name, train data, lr) stages with `method` each time: accuracy on `test` at the
    end, and after the first stage (what the intermediate domain did to the final target)."""
    with tempfile.TemporaryDirectory() as workdir:
        plan = MultiStage([Stage(name, METHODS[method].make(arch), train, None, replace(config, lr=lr))
                           for name, train, lr in stages], workdir)
        start = time.perf_counter()
        model = plan.run(copy.deepcopy(pretrained), resume=False)
        seconds = time.perf_counter() - start
        first_stage = copy.deepcopy(pretrained)  # every stage finishes as the plain architecture (LoRA merged)
        load_state(first_stage, os.path.join(plan.stage_dir(0), FINAL), "first stage")
    return {
        "accuracy": _evaluate(model, test, config),
        "after_first_stage_accuracy": _evaluate(first_stage, test, config),
        "trainable_parameters": plan.results[-1]["trainable_parameters"],
        "seconds": seconds,
        "lr": [lr for _, _, lr in stages],
    }


def cross_validated_lr(pretrained: nn.Module, arch: str, method: str, train: DigitDataset,
                       config: TrainConfig) -> tuple[float, dict[float, float]]:
    """The rate of LR_GRID with the best mean held-out accuracy over 2 class-stratified folds of `train`."""
    first, second = split_indices(len(train), len(train) // 2, 0, train.labels.numpy())
    plain = copy.copy(train)
    plain.transform = None  # held-out folds are evaluated as test images are: not augmented
    folds = [(Subset(train, a), Subset(plain, b)) for a, b in ((first, second), (second, first))]
    scores = {lr: statistics.fmean(transfer(pretrained, arch, method, fit, held_out, config, lr)["accuracy"]
                                   for fit, held_out in folds) for lr in LR_GRID}
    best = max(scores.values())
    return min(lr for lr, score in scores.items() if score == best), scores


# ------------------------------------------------------------------------------------------ report


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (architecture, method), in run order: mean ± std accuracy per target over seeds."""
    rows: dict[tuple[str, str], dict] = {}
    for run in runs:
        row = rows.setdefault((run["architecture"], run["method"]), {
            "architecture": run["architecture"], "method": run["method"], "label": run["label"],
            "trainable_parameters": run["trainable_parameters"], "targets": {}, "seconds": []})
        row["targets"].setdefault(run["target"], []).append(run["accuracy"])
        row["seconds"].append(run["seconds"])
    for row in rows.values():
        row["targets"] = {target: {"mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                                   "seeds": len(acc)} for target, acc in row["targets"].items()}
        row["seconds"] = statistics.fmean(row["seconds"])
    return list(rows.values())


def table(rows: list[dict]) -> str:
    lines = ["| model | strategy | trainable params | USPS | MNIST-M | train s/run |",
             "| --- | --- | ---: | --- | --- | ---: |"]
    for row in rows:
        cells = [f"{row['targets'][t]['mean']:.3f} ± {row['targets'][t]['std']:.3f}" if t in row["targets"] else "—"
                 for t in TARGETS]
        lines.append(f"| {row['architecture']} | {row['label']} | {row['trainable_parameters']:,} | "
                     f"{cells[0]} | {cells[1]} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path) -> bool:
    try:
        from matplotlib.figure import Figure  # lazily: only the plot needs matplotlib
    except ImportError:
        return False
    figure = Figure(figsize=(12, 5), layout="constrained")
    markers = {"cnn": "o", "vit": "s"}
    for axes, target in zip(figure.subplots(1, len(TARGETS), sharey=True), TARGETS):
        for row in rows:
            if target not in row["targets"] or row["method"].startswith("multistage_"):  # those are in the table
                continue
            result = row["targets"][target]
            axes.errorbar(row["trainable_parameters"], result["mean"], yerr=result["std"], capsize=3,
                          marker=markers[row["architecture"]], color="C0" if row["architecture"] == "cnn" else "C1")
            axes.annotate(row["method"], (row["trainable_parameters"], result["mean"]), fontsize=7,
                          xytext=(4, 2), textcoords="offset points")
        axes.set_xscale("symlog", linthresh=100)
        axes.set_xlabel("trainable parameters (0 = no adaptation)")
        axes.set_title(f"MNIST -> {TARGET_NAMES[target]}, {PER_CLASS} labels/class")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("target test accuracy (mean ± std over seeds)")
    figure.legend(handles=[figure.axes[0].plot([], [], markers[a], color=c, label=a)[0]
                           for a, c in (("cnn", "C0"), ("vit", "C1"))], loc="lower right")
    figure.savefig(path, dpi=110)
    return True


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pretrain_all(architectures, root, quick: bool, progress: bool) -> dict:
    train, val = load_source(root, limit=300 if quick else None)
    models = {}
    for arch in architectures:
        config = replace(PRETRAIN[arch], epochs=1) if quick else PRETRAIN[arch]
        models[arch] = pretrain(arch, train, val, config, progress)
        _log(f"pre-trained {arch} on MNIST: source val {models[arch]['source_val_accuracy']:.4f}, "
             f"{models[arch]['seconds']:.0f} s")
    return models


def select_learning_rates(pretrained: dict, architectures, root, config: TrainConfig) -> dict:
    chosen = {}
    for target in TARGETS:
        data = load_target(target, 0, root)
        for arch in architectures:
            for method in (m for m in METHODS.values() if m.make is not None and arch in m.architectures):
                lr, scores = cross_validated_lr(pretrained[arch]["model"], arch, method.name, data.train, config)
                chosen[(arch, method.name, target)] = lr
                _log(f"{arch} {method.name} {target}: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
                     + f" -> {lr:g}")
    return chosen


def run_benchmark(pretrained: dict, architectures, methods, seeds: int, root, config: TrainConfig,
                  test_limit: int | None) -> list[dict]:
    runs = []
    for seed in range(seeds):
        data = {target: load_target(target, seed, root, test_limit) for target in TARGETS}
        for arch in architectures:
            model = pretrained[arch]["model"]
            for method in (METHODS[name] for name in methods if arch in METHODS[name].architectures):
                for target in TARGETS:
                    lr = None if method.make is None else learning_rate(arch, method.name, target)
                    result = transfer(model, arch, method.name, data[target].train, data[target].test, config, lr)
                    runs.append({"architecture": arch, "method": method.name, "label": method.label, "target": target,
                                 "seed": seed, **result})
                    _log(f"seed {seed} {arch} {method.name} -> {target}: {result['accuracy']:.4f}, "
                         f"{result['seconds']:.1f} s")
            for name in (name for name in MULTISTAGE if name in methods):
                stages = [
                    (target, data[target].train, learning_rate(arch, name, target)) for target in ("mnist_m", "usps")
                ]
                result = transfer_in_stages(model, arch, name, stages, data["usps"].test, config)
                runs.append({"architecture": arch, "method": f"multistage_{name}", "target": "usps", "seed": seed,
                             "label": f"multi-stage {METHODS[name].label}: MNIST → MNIST-M → USPS", **result})
                _log(f"seed {seed} {arch} multi-stage {name} -> usps: {result['accuracy']:.4f}, "
                     f"{result['seconds']:.1f} s")
    return runs


def _names(spec: str, known, what: str) -> list[str]:
    names = list(known) if spec == "all" else [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or [spec]}: expected 'all' or a comma list of {', '.join(known)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.finetune.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="transfer runs per strategy, seeds 0..seeds-1")
    parser.add_argument("--models", default="all", help=f"'all' or a comma list of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--methods", default="all", help=f"'all' or a comma list of {', '.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the models are small, and on a small shared CPU more threads "
                             "wait on each other)")
    parser.add_argument("--data-root", default=None,
                        help="folder with mnist/, usps/, mnist_m/ (default: LOWRANK_DATA or ../shared/data/digits)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: ./benchmarks/results/finetune in a lowrank checkout, else the current directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 epoch: a smoke test, not a result")
    parser.add_argument("--select-lr", action="store_true",
                        help="cross-validate LR_GRID on seed 0's labelled target images and print LEARNING_RATES")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        architectures = _names(args.models, ARCHITECTURES, "model(s)")
        methods = _names(args.methods, METHODS, "method(s)")
    except ValueError as err:
        parser.error(str(err))
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    config = replace(TRANSFER, epochs=1, progress=False) if args.quick else replace(TRANSFER, progress=False)

    started = time.perf_counter()
    try:
        pretrained = _pretrain_all(architectures, args.data_root, args.quick, not args.no_progress)
        if args.select_lr:
            chosen = select_learning_rates(pretrained, architectures, args.data_root, config)
            print("LEARNING_RATES = {\n" + "".join(f"    {key!r}: {lr:g},\n" for key, lr in chosen.items()) + "}")
            return 0
        runs = run_benchmark(pretrained, architectures, methods, 1 if args.quick else args.seeds, args.data_root,
                             config, 200 if args.quick else None)
    except FileNotFoundError as err:  # the loaders name the missing file and where to get it
        print(f"lowrank.finetune.bench: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started

    rows = summarise(runs)
    text = table(rows)
    print(text)
    args.out_dir = args.out_dir or default_results_dir("finetune")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / ("finetune_digits" + ("_quick" if args.quick else ""))
    report = {"command": "python -m lowrank.finetune.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "quick": args.quick, "total_seconds": seconds,
              "pretraining": {arch: {k: v for k, v in p.items() if k != "model"} for arch, p in pretrained.items()},
              "transfer_config": {"epochs": config.epochs, "batch_size": config.batch_size,
                                  "scheduler": config.scheduler, "per_class": PER_CLASS},
              "summary": rows, "runs": runs}
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    Path(f"{stem}.md").write_text(f"Target test accuracy, mean ± std over seeds; total {seconds:.0f} s on "
                                  f"{torch.get_num_threads()} torch thread(s), {cpu_model()}.\n\n{text}\n")
    _log(f"wrote {stem}.json and {stem}.md ({seconds:.0f} s in all)")
    if write_plot(rows, Path(f"{stem}.png")):
        _log(f"wrote {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
