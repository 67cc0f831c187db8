"""`python -m lowrank.finetune --config run.yaml|run.json`: build a model, data and stages from a config and train.

    model:      {name: cnn | vit, <constructor arguments>, weights: <.safetensors to start from>}
                or {factory: "package.module:function", <its arguments>, weights: ...}
    data_root:  folder of the digit data (default: lowrank.data.default_root())
    output_dir: where checkpoints, metrics and the final model.safetensors go (required)
    resume:     continue a stopped run in output_dir (default true)
    stages:     a list of
                  {name, strategy: {name: <strategy>, <its options>},
                   train_data: <data>, eval_data: <data> (optional), train: {<TrainConfig fields>}}
                (train: {distributed: ddp} with `torchrun --nproc_per_node N -m lowrank.finetune --config ...`)
    <data>:     {domain: mnist | usps | mnist_m | svhn, split, per_class: k labelled images per class,
                 limit: n random images, seed, size: 28, channels: 1}

Every level refuses keys it does not know, naming them and the keys it accepts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from lowrank.finetune.distributed import barrier, is_main_process
from lowrank.finetune.models import MODELS
from lowrank.finetune.multistage import MultiStage, Stage
from lowrank.finetune.strategies import make_strategy
from lowrank.finetune.trainer import TrainConfig, load_state, save_state

__all__ = ["load_config", "build_model", "build_dataset", "run_config", "main"]

TOP_KEYS = ("model", "data_root", "output_dir", "resume", "stages")
STAGE_KEYS = ("name", "strategy", "train_data", "eval_data", "train")
DATA_KEYS = ("domain", "split", "per_class", "limit", "seed", "size", "channels")


def _check_keys(where: str, values, allowed, required=()) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(allowed)}")
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def load_config(path: str | os.PathLike) -> dict:
    """A run config from a .json or .yaml/.yml file (YAML needs PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); or write the config as JSON") \
                from None
        config = yaml.safe_load(text)
    elif path.suffix == ".json":
        config = json.loads(text)
    else:
        raise ValueError(f"config file {path}: expected a .json, .yaml or .yml file")
    _check_keys(f"config {path}", config, TOP_KEYS, required=("model", "output_dir", "stages"))
    return config


def build_model(spec: dict) -> nn.Module:
    spec = dict(spec)
    weights = spec.pop("weights", None)
    if "factory" in spec:
        module_name, _, function = spec.pop("factory").partition(":")
        factory = getattr(importlib.import_module(module_name), function)
    else:
        name = spec.pop("name", None)
        if name not in MODELS:
            raise ValueError(f"model: name must be one of {sorted(MODELS)} (or give factory: 'module:function'), "
                             f"got {name!r}")
        factory = MODELS[name]
    model = factory(**spec)
    if weights is not None:
        load_state(model, os.fspath(weights), "model.weights")
    return model


def build_dataset(spec: dict, root, where: str):
    from lowrank.data import DigitDataset, load_digits, sample_per_class, sample_subset

    _check_keys(where, spec, DATA_KEYS, required=("domain", "split"))
    arrays = load_digits(spec["domain"], spec["split"], root)
    seed = spec.get("seed", 0)
    if spec.get("per_class") is not None:
        arrays = arrays.subset(sample_per_class(arrays.labels, spec["per_class"], seed))
    if spec.get("limit") is not None:
        arrays = arrays.subset(sample_subset(len(arrays), min(spec["limit"], len(arrays)), seed))
    return DigitDataset(arrays, size=spec.get("size", 28), channels=spec.get("channels", 1))


def build_stages(config: dict) -> list[Stage]:
    root = config.get("data_root")
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"data_root {root} does not exist")
    if not isinstance(config["stages"], list) or not config["stages"]:
        raise ValueError("stages: expected a non-empty list of stages")
    stages = []
    for i, spec in enumerate(config["stages"]):
        where = f"stages[{i}]"
        _check_keys(where, spec, STAGE_KEYS, required=("name", "strategy", "train_data"))
        try:
            strategy = make_strategy(spec["strategy"])
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
        stages.append(Stage(
            name=spec["name"], strategy=strategy,
            train_data=build_dataset(spec["train_data"], root, f"{where}.train_data"),
            eval_data=None if spec.get("eval_data") is None else build_dataset(spec["eval_data"], root,
                                                                               f"{where}.eval_data"),
            config=TrainConfig.from_dict(spec.get("train", {}), f"{where}.train"),
        ))
    return stages


def run_config(config: dict) -> list[dict]:
    """Train as the config says; returns each stage's last metrics. Writes <output_dir>/model.safetensors."""
    stages = build_stages(config)
    model = build_model(config["model"])
    runner = MultiStage(stages, config["output_dir"])
    model = runner.run(model, resume=config.get("resume", True))
    if is_main_process():
        save_state(model.state_dict(), os.path.join(config["output_dir"], "model.safetensors"))
    barrier()
    return runner.results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config, .yaml/.yml or .json")
    args = parser.parse_args(argv)
    try:
        results = run_config(load_config(args.config))
        if is_main_process():
            for result in results:
                print(json.dumps(result))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:  # under torchrun the Trainer joined the process group; leave it before the process exits
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
