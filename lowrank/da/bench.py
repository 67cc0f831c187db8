"""Digit domain-adaptation benchmark against the ADDA paper's Table 2 (Tzeng et al. 2017).

    python -m lowrank.da.bench --task mnist-usps --method all --seeds 3
    python -m lowrank.da.bench --task usps-mnist --method adda,dann --seeds 5
    python -m lowrank.da.bench --task mnist-usps --method dann --quick     # tiny smoke run
    python -m lowrank.da.bench --task mnist-usps --framing stretch         # USPS upscaled 16 -> 28
    python -m lowrank.da.bench --task mnist-mnistm --normalisation per_domain  # each domain's own mean/std
    python -m lowrank.da.bench --task mnist-usps --augment off             # no random affine warps
    python -m lowrank.da.bench --task mnist-mnistm --method dann --set lr=0.003 --set steps=2000

For each method and seed 0..seeds-1: draw the seed's source and target samples (lowrank.da.tasks),
fit on labelled source and unlabelled target batches, and measure accuracy on the target test
split (and on the source validation set). Prints one table, mean ± std (sample std over seeds)
of target accuracy beside the published numbers, and writes <out-dir>/da_<task>.json (every run,
with its training log) and da_<task>.png (a bar chart; needs matplotlib); with a subset of methods
the files are da_<task>_<method+method>.*, and a USPS framing, normalisation, network or
augmentation other than the task's own adds a suffix (lowrank.da.tasks.variant_suffix), and each
--set name=value adds _<name><value>.

How each choice was made (none on target labels; the target test split is only ever reported):
  fixed from the papers   DANN's SGD (lr 0.01, momentum 0.9), its λ_p and μ_p schedules and 64 + 64
                          batches; ADDA's Adam 2e-4 / β1 0.5 and FC 500-500-2 discriminator; CoGAN's
                          Adam 2e-4 / β1 0.5; the networks (ADDA's LeNet for MNIST<->USPS, the DANN
                          paper's MNIST->MNIST-M network for that task: lowrank.da.models)
  from the data sets'     USPS framed as MNIST frames its digits (20x20 box centred in 28x28,
  documentation           lowrank.da.tasks; --framing stretch gives the plain 16 -> 28 upscale)
  source validation       augmentation (random affine warps) of the training images: on where it
                          raises Source only's source validation accuracy on every seed (MNIST<->USPS)
  label-free              fixed normalisation for MNIST->MNIST-M too: reverse validation scored it
                          over per-domain for DANN (--normalisation per_domain gives the other)
  for run time            step counts and CoGAN's batch of 32, and DANN's 11000 steps on
                          MNIST->MNIST-M (lowrank.da.methods.TASK_DEFAULTS; the timings behind
                          them are in docs/domain-adaptation.md); source training Adam 1e-3,
                          weight decay 5e-4, not tuned
Label-free checks of other settings: python -m lowrank.da.select (reverse validation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lowrank._machine import default_results_dir
from lowrank.da.methods import METHODS, check_hyperparameters, make_method
from lowrank.da.models import NETWORKS
from lowrank.da.tasks import FRAMINGS, NORMALISATIONS, TASKS, get_task, load_task_data, make_loader, variant_suffix

# ADDA paper, Table 2: (mean, std or None). Not listed there: None.
PUBLISHED = {
    "mnist-usps": {"source_only": (0.752, 0.016), "dann": (0.771, 0.018), "domain_confusion": (0.791, 0.005),
                   "cogan": (0.912, 0.008), "adda": (0.894, 0.002)},
    "usps-mnist": {"source_only": (0.571, 0.017), "dann": (0.730, 0.020), "domain_confusion": (0.665, 0.033),
                   "cogan": (0.891, 0.008), "adda": (0.901, 0.008)},
    "svhn-mnist": {"source_only": (0.601, 0.011), "dann": (0.739, None), "domain_confusion": (0.681, 0.003),
                   "adda": (0.760, 0.018)},
    "mnist-mnistm": {},
}
QUICK_SIZES = {"n_source": 256, "n_target": 256, "n_test": 256}
QUICK_STEPS = 8


def _format(mean, std) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _methods(spec: str) -> list[str]:
    names = list(METHODS) if spec == "all" else [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown method(s) {unknown or [spec]}: expected 'all' or a comma list of {', '.join(METHODS)}"
        )
    return names


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every domain-adaptation driver takes: threads, data and output folders, --quick."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's, every core; use 1 for runs side by side)")
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder with mnist/, usps/, mnist_m/, svhn/ (default: LOWRANK_DATA or ../shared/data/digits)",
    )
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: ./benchmarks/results/da in a lowrank checkout, else the current directory")
    parser.add_argument("--quick", action="store_true", help="tiny samples and a few steps: a smoke test, not a result")
    parser.add_argument("--no-progress", action="store_true")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def parse_assignment(method: str, spec: str) -> tuple[str, list]:
    """"lr=0.01,0.003" -> ("lr", [0.01, 0.003]), values typed as JSON reads them (else strings);
    the name must be one of `method`'s hyper-parameters and each value of its type and range."""
    name, sep, values = spec.partition("=")
    if not sep or not values:
        raise ValueError(f"{spec!r}: expected name=value[,value...]")
    if name not in METHODS[method].defaults:
        raise ValueError(
            f"{spec!r}: {method} has no hyper-parameter {name!r}; it takes {sorted(METHODS[method].defaults)}"
        )
    typed = [_typed(value) for value in values.split(",")]
    for value in typed:
        check_hyperparameters(repr(spec), METHODS[method].defaults, {name: value})
    return name, typed


def _typed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def quick_steps(method: str) -> dict:
    """The step-count overrides of a --quick run of `method`."""
    return {k: QUICK_STEPS for k in ("steps", "source_steps", "adapt_steps") if k in METHODS[method].defaults}


def fit_method(method: str, task, seed: int, source, target, progress: bool, **kwargs):
    """make_method(method, task, seed=seed, ...) fitted on `source` (labelled) and `target` datasets,
    each in its own seeded order."""
    model = make_method(method, task, seed=seed, progress=progress, **kwargs)
    batch_size = model.hparams["batch_size"]
    return model.fit(make_loader(source, batch_size, seed), make_loader(target, batch_size, seed + 1))


def accuracy(model, dataset) -> float:
    return model.evaluate(make_loader(dataset, 1000, 0, shuffle=False, drop_last=False))


def run_one(task: str, method: str, seed: int, data, quick: bool, progress: bool, settings: dict | None = None) -> dict:
    """One fit and evaluation; `settings` override the method's hyper-parameters."""
    start = time.perf_counter()
    model = fit_method(method, task, seed, data.source_train, data.target_train, progress,
                       log_every=QUICK_STEPS // 2 if quick else 100,
                       **{**(quick_steps(method) if quick else {}), **(settings or {})})
    seconds = time.perf_counter() - start
    return {"method": method, "seed": seed, "target_accuracy": accuracy(model, data.target_test),
            "source_val_accuracy": accuracy(model, data.source_val), "train_seconds": seconds,
            "sizes": {"source_train": len(data.source_train), "target_train": len(data.target_train),
                      "target_test": len(data.target_test)},
            "hparams": model.hparams, "history": model.history}


def summarise(task: str, methods: list[str], runs: list[dict]) -> list[dict]:
    rows = []
    for method in methods:
        accuracies = [r["target_accuracy"] for r in runs if r["method"] == method]
        published = PUBLISHED.get(task, {}).get(method)
        rows.append({
            "method": method, "seeds": len(accuracies),
            "mean": statistics.fmean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "source_val_mean": statistics.fmean(r["source_val_accuracy"] for r in runs if r["method"] == method),
            "seconds_mean": statistics.fmean(r["train_seconds"] for r in runs if r["method"] == method),
            "published_mean": published[0] if published else None,
            "published_std": published[1] if published else None,
        })
    return rows


def table(task, rows: list[dict]) -> str:
    framing = f", USPS framing {task.framing}" if task.framing else ""
    augment = ", augmented" if task.augment else ""
    lines = [
        f"{task.name} ({task.network} network{framing}, {task.normalisation} normalisation{augment}): target test "
        "accuracy, mean ± std over seeds "
        "(published: ADDA paper, Table 2)",
        "",
        "| Method | ours | published | seeds | source val | train s/run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {_format(row['mean'], row['std'])} | "
                     f"{_format(row['published_mean'], row['published_std'])} | {row['seeds']} | "
                     f"{row['source_val_mean']:.3f} | {row['seconds_mean']:.0f} |")
    return "\n".join(lines)


def write_plot(task, rows: list[dict], path: Path) -> bool:
    try:
        from matplotlib.figure import Figure  # lazily: only the plot needs matplotlib
    except ImportError:
        return False
    figure = Figure(figsize=(1.6 * len(rows) + 2, 3.6), layout="constrained")
    axes = figure.subplots()
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r["mean"] for r in rows], 0.4, yerr=[r["std"] for r in rows],
             capsize=3, label="lowrank.da")
    published = [(p, r) for p, r in zip(positions, rows) if r["published_mean"] is not None]
    if published:
        axes.bar([p + 0.2 for p, _ in published], [r["published_mean"] for _, r in published], 0.4,
                 yerr=[r["published_std"] or 0.0 for _, r in published], capsize=3, label="published (ADDA Table 2)")
    axes.set_xticks(list(positions), [r["method"] for r in rows])
    axes.set_ylim(0, 1)
    axes.set_ylabel("target test accuracy")
    framing = f", USPS {task.framing}" if task.framing else ""
    axes.set_title(f"{task.name} ({rows[0]['seeds']} seeds{framing})")
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.da.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--method", default="all", help=f"'all' or a comma list of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0..seeds-1")
    parser.add_argument("--framing", choices=list(FRAMINGS), default=None,
                        help="how USPS digits are framed at 28x28 (MNIST<->USPS tasks; default: mnist_box)")
    parser.add_argument("--normalisation", choices=list(NORMALISATIONS), default=None,
                        help="pixel normalisation (default: the task's; lowrank.da.tasks)")
    parser.add_argument("--network", choices=list(NETWORKS), default=None,
                        help="the network every method uses (default: the task's; lowrank.da.models)")
    parser.add_argument("--augment", choices=("on", "off"), default=None,
                        help="random affine warps of the training images (default: the task's; lowrank.da.tasks)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a hyper-parameter of the one --method (repeatable; e.g. a lowrank.da.select choice)",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        augment = None if args.augment is None else args.augment == "on"
        task = get_task(args.task, framing=args.framing, normalisation=args.normalisation, augment=augment,
                        network=args.network)
        methods = _methods(args.method)
        if args.set and len(methods) != 1:
            raise ValueError(f"--set needs exactly one --method, got {', '.join(methods)}")
        settings = {}
        for spec in args.set:
            name, values = parse_assignment(methods[0], spec)
            if len(values) != 1:
                raise ValueError(f"--set {spec!r}: expected one value")
            settings[name] = values[0]
    except ValueError as err:
        parser.error(str(err))
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    runs = []
    for seed in range(args.seeds):
        try:
            data = load_task_data(task, seed, root=args.data_root, **(QUICK_SIZES if args.quick else {}))
        except (FileNotFoundError, ValueError, ImportError) as err:  # missing or corrupt file, or h5py: named
            print(f"lowrank.da.bench: cannot load the data for task {task.name}: {err}", file=sys.stderr)
            return 2
        for method in methods:
            run = run_one(task.name, method, seed, data, args.quick, not args.no_progress, settings)
            print(f"{method} seed {seed}: target {run['target_accuracy']:.4f}, source val "
                  f"{run['source_val_accuracy']:.4f}, {run['train_seconds']:.0f} s", file=sys.stderr, flush=True)
            runs.append(run)
    runs.sort(key=lambda run: (methods.index(run["method"]), run["seed"]))

    rows = summarise(task.name, methods, runs)
    print(table(task, rows))
    args.out_dir = args.out_dir or default_results_dir("da")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # --method all writes da_<task>; a subset writes da_<task>_<methods>, leaving the full table alone.
    variant = variant_suffix(task)
    stem = args.out_dir / (f"da_{task.name}" + ("" if args.method == "all" else "_" + "+".join(methods))
                           + variant + "".join(f"_{name}{value}" for name, value in settings.items())
                           + ("_quick" if args.quick else ""))
    report = {"task": task.name, "framing": task.framing, "network": task.network,
              "normalisation": task.normalisation, "augment": task.augment, "quick": args.quick,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "command": "python -m lowrank.da.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "summary": rows, "runs": runs}
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {stem}.json", file=sys.stderr)
    if write_plot(task, rows, Path(f"{stem}.png")):
        print(f"wrote {stem}.png", file=sys.stderr)
    else:
        print("no plot: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
