"""Label-free hyper-parameter selection for the adaptation methods: reverse validation (Zhong et
al. 2010), the criterion the DANN paper (Ganin et al. 2016, section 5.1.2) tunes DANN with.

For one candidate setting of a method on a task and seed:
  1. fit the method forward: the labelled source training images, the unlabelled target pool;
  2. label the target pool with the forward model's predictions (pseudo-labels);
  3. fit a fresh instance with the same setting backward: the pseudo-labelled target pool is its
     labelled source, the source training images (labels dropped) its unlabelled target;
  4. the score is the backward model's accuracy on the source validation set.
A setting that adapts well gives pseudo-labels from which the way back to the source works. Only
source labels are read. The highest score wins; a tie goes to the earlier candidate.

    python -m lowrank.da.select --task mnist-mnistm --method dann --grid lr=0.01,0.003 --seed 0

prints one row per candidate and writes <out-dir>/da_select_<task>_<method>[_<variant>]_<names>.json
(<names>: the grid's hyper-parameter names joined by "+"; variant: lowrank.da.tasks.variant_suffix). The forward
model's target test accuracy is reported beside each score, to show how well the criterion
tracks it; it takes no part in the choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
from torch.utils.data import Dataset

from lowrank._machine import default_results_dir
from lowrank.da.bench import QUICK_SIZES, accuracy, add_run_options, fit_method, parse_assignment, quick_steps
from lowrank.da.methods import METHODS
from lowrank.da.models import NETWORKS
from lowrank.da.tasks import NORMALISATIONS, TASKS, TaskData, UnlabelledImages, get_task, load_task_data, variant_suffix

__all__ = ["reverse_validation", "select", "parse_grid"]


class _PseudoLabelled(Dataset):
    """The target pool (UnlabelledImages, its transform kept) as (image, pseudo-label) pairs."""

    def __init__(self, images: UnlabelledImages, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index][0], self.labels[index]


def _predict_all(method, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([method.predict(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def reverse_validation(method: str, task, seed: int, data: TaskData, hparams: dict, progress: bool = False) -> dict:
    """Fit `method` forward and backward with `hparams` (steps overrides included); returns the
    reverse-validation score and the forward model's source validation and target test accuracy."""
    start = time.perf_counter()
    forward = fit_method(method, task, seed, data.source_train, data.target_train, progress, **hparams)
    pseudo_labels = _predict_all(forward, data.target_train.images)
    source_images = UnlabelledImages(data.source_train.images, data.source_train.transform)
    backward = fit_method(method, task, seed, _PseudoLabelled(data.target_train, pseudo_labels), source_images,
                          progress, **hparams)
    return {"hparams": hparams, "reverse_accuracy": accuracy(backward, data.source_val),
            "source_val_accuracy": accuracy(forward, data.source_val),
            "target_accuracy": accuracy(forward, data.target_test),  # reported only, never used to choose
            "pseudo_label_counts": torch.bincount(pseudo_labels, minlength=10).tolist(),
            "seconds": time.perf_counter() - start}


def select(results: list[dict]) -> dict:
    """The candidate with the highest reverse-validation accuracy (the earlier one on a tie)."""
    if not results:
        raise ValueError("select: no candidates")
    return max(results, key=lambda r: r["reverse_accuracy"])  # max keeps the first of equal keys


def parse_grid(method: str, specs: list[str]) -> list[dict]:
    """["lr=0.01,0.003", "steps=2000"] -> every combination, as hyper-parameter dicts, in order."""
    axes = []
    for spec in specs:
        name, values = parse_assignment(method, spec)
        axes.append([(name, value) for value in values])
    return [dict(combination) for combination in itertools.product(*axes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.da.select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(m for m in METHODS if m != 'source_only')}")
    parser.add_argument("--grid", action="append", default=[], help="name=v1,v2,... (repeat for a product grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalisation", choices=list(NORMALISATIONS), default=None)
    parser.add_argument("--network", choices=list(NETWORKS), default=None)
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task, normalisation=args.normalisation, network=args.network)
        if args.method not in METHODS or args.method == "source_only":
            raise ValueError(f"unknown adaptation method {args.method!r}: expected one of "
                             f"{', '.join(m for m in METHODS if m != 'source_only')}")
        candidates = parse_grid(args.method, args.grid) if args.grid else [{}]
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data = load_task_data(task, args.seed, root=args.data_root, **(QUICK_SIZES if args.quick else {}))
    except (FileNotFoundError, ValueError, ImportError) as err:  # missing or corrupt file, or h5py: named
        print(f"lowrank.da.select: cannot load the data for task {task.name}: {err}", file=sys.stderr)
        return 2
    steps = quick_steps(args.method) if args.quick else {}
    results = []
    for candidate in candidates:
        result = reverse_validation(args.method, task, args.seed, data, {**steps, **candidate},
                                    progress=not args.no_progress)
        print(f"{candidate}: reverse {result['reverse_accuracy']:.4f}, {result['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        results.append(result)
    chosen = select(results)

    lines = [
        f"{task.name} {args.method} ({task.network} network, {task.normalisation} normalisation), seed {args.seed}: "
        f"reverse validation (chosen: {chosen['hparams']})",
        "",
        "| hyper-parameters | reverse val | source val | target test (not used) | s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mark = " **chosen**" if r is chosen else ""
        lines.append(f"| {r['hparams']}{mark} | {r['reverse_accuracy']:.3f} | {r['source_val_accuracy']:.3f} | "
                     f"{r['target_accuracy']:.3f} | {r['seconds']:.0f} |")
    print("\n".join(lines))
    args.out_dir = args.out_dir or default_results_dir("da")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    searched = "+".join(dict.fromkeys(key for candidate in candidates for key in candidate)) or "defaults"
    path = args.out_dir / (f"da_select_{task.name}_{args.method}{variant_suffix(task)}_{searched}"
                           f"{'_quick' if args.quick else ''}.json")
    path.write_text(json.dumps({"task": task.name, "method": args.method, "seed": args.seed,
                                "normalisation": task.normalisation, "network": task.network,
                                "augment": task.augment, "quick": args.quick, "threads": torch.get_num_threads(),
                                "command": "python -m lowrank.da.select " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                                "chosen": chosen["hparams"], "candidates": results}, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
