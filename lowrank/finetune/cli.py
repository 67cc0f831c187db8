"""`python -m lowrank.finetune --config run.yaml|run.json`: build a model, data and stages from a config and train.

    model:      {name: cnn | vit, <constructor arguments>, weights: <.safetensors to start from>}
                or {factory: "package.module:function", <its arguments>, weights: ...}
    data_root:  folder of the digit data (default: lowrank.data.default_root())
    output_dir: where checkpoints, metrics and the final model.safetensors go (required)
    resume:     continue a stopped run in output_dir (default true)
    change_config: let that run continue under a changed train: config (default false: refused),
                recorded as a new segment of the stage's metrics.json
    stages:     a list of
                  {name, strategy: {name: <strategy>, <its options>},
                   train_data: <data>, eval_data: <data> (optional), train: {<TrainConfig fields>}}
                (train: {distributed: ddp} with `torchrun --nproc_per_node N -m lowrank.finetune --config ...`)
    <data>:     {domain: mnist | usps | mnist_m | svhn, split, per_class: k labelled images per class,
                 limit: n random images, seed, size: 28, channels: 1}

Every level refuses keys it does not know, naming them and the keys it accepts, and values of the
wrong type or range; YAML keys must be unique, and 1e-3 reads as a number. main() prints each error
as one line naming the file, the key and what was expected, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

from lowrank._files import read_json
from lowrank.finetune.distributed import barrier, is_main_process
from lowrank.finetune.models import MODELS
from lowrank.finetune.multistage import MultiStage, Stage
from lowrank.finetune.strategies import make_strategy
from lowrank.finetune.trainer import TrainConfig, load_state, save_state

__all__ = ["load_config", "build_model", "build_dataset", "run_config", "main"]

TOP_KEYS = ("model", "data_root", "output_dir", "resume", "change_config", "stages")
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


def _yaml_loader(path: Path):
    """PyYAML's safe loader, refusing a key repeated in one mapping (which it would let the last win),
    and reading the YAML 1.2 float forms without a dot (1e-3) as numbers, not strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key == "<<":  # a merge key; merged entries may be overridden
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ValueError(f"config {path}, line {line}: key {key!r} appears twice in one mapping (first "
                                     f"at line {seen[key]}); expected each key once")
                seen[key] = line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def load_config(path: str | os.PathLike) -> dict:
    """A run config from a .json or .yaml/.yml file (YAML needs PyYAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); or write the config as JSON") \
                from None
        try:
            config = yaml.load(path.read_text(), Loader=_yaml_loader(path))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config {path}{where}: not valid YAML: {problem}") from None
    elif path.suffix == ".json":
        config = read_json(path, "config")
    else:
        raise ValueError(f"config file {path}: expected a .json, .yaml or .yml file")
    _check_keys(f"config {path}", config, TOP_KEYS, required=("model", "output_dir", "stages"))
    for key in ("resume", "change_config"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"{key}: expected true or false, got {config[key]!r}")
    for key in ("output_dir", "data_root"):
        if key in config and not isinstance(config[key], str):
            raise ValueError(f"{key}: expected a path (a string), got {config[key]!r}")
    return config


def _check_arguments(where: str, function, values: dict) -> None:
    """Refuse keys `function` does not take and values whose type differs from its default's."""
    parameters = inspect.signature(function).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(values) - set(parameters))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(parameters)}")
    for name, value in values.items():
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        if isinstance(default, bool) or default is None or default is inspect.Parameter.empty:
            continue
        kinds = (int, float) if isinstance(default, float) else (type(default),)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kinds):
            raise ValueError(f"{where}.{name}: expected a value of type {type(default).__name__} (default "
                             f"{default!r}), got {value!r}")


def _factory(spec: str):
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"model.factory: expected 'package.module:function', got {spec!r}")
    module_name, function = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.factory: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"model.factory: module {module_name!r} has no function {function!r}")
    return factory


def build_model(spec: dict) -> nn.Module:
    if not isinstance(spec, dict):
        raise ValueError(f"model: expected a mapping with a name or a factory, got {spec!r}")
    spec = dict(spec)
    weights = spec.pop("weights", None)
    if "factory" in spec:
        factory = _factory(spec.pop("factory"))
    else:
        name = spec.pop("name", None)
        if name not in MODELS:
            raise ValueError(f"model: name must be one of {sorted(MODELS)} (or give factory: 'module:function'), "
                             f"got {name!r}")
        factory = MODELS[name]
    _check_arguments("model", factory, spec)
    try:
        model = factory(**spec)
    except ValueError as err:  # the constructor's own check of its arguments
        raise ValueError(f"model: {err}") from None
    if weights is not None:
        load_state(model, os.fspath(weights), "model.weights")
    return model


def _whole_number(where: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{where}: expected an integer of at least {least}, got {value!r}")


def build_dataset(spec: dict, root, where: str):
    from lowrank.data import DigitDataset, load_digits, sample_per_class, sample_subset

    _check_keys(where, spec, DATA_KEYS, required=("domain", "split"))
    for key, least in (("per_class", 1), ("limit", 1), ("seed", 0), ("size", 1)):
        if spec.get(key) is not None:
            _whole_number(f"{where}.{key}", spec[key], least)
    if spec.get("channels", 1) not in (1, 3) or isinstance(spec.get("channels"), bool):
        raise ValueError(f"{where}.channels: expected 1 or 3, got {spec['channels']!r}")
    try:
        arrays = load_digits(spec["domain"], spec["split"], root)
        seed = spec.get("seed", 0)
        if spec.get("per_class") is not None:
            arrays = arrays.subset(sample_per_class(arrays.labels, spec["per_class"], seed))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if spec.get("limit") is not None:
        arrays = arrays.subset(sample_subset(len(arrays), min(spec["limit"], len(arrays)), seed))
    return DigitDataset(arrays, size=spec.get("size", 28), channels=spec.get("channels", 1))


def _check_images_fit(model: nn.Module, model_spec: dict, stages: list[Stage]) -> None:
    """Run the model on one image of each data set, so a channels or size it cannot take is named now."""
    was_training = model.training
    model.eval()
    try:
        for index, stage in enumerate(stages):
            for key, data in (("train_data", stage.train_data), ("eval_data", stage.eval_data)):
                if data is None or len(data) == 0:
                    continue
                image = data[0][0]
                try:
                    with torch.no_grad():
                        model(image.unsqueeze(0))
                except (RuntimeError, ValueError) as err:
                    takes = ""
                    if model_spec.get("name") in MODELS:
                        defaults = inspect.signature(MODELS[model_spec["name"]]).parameters
                        takes = (f"; model {model_spec['name']} takes in_channels="
                                 f"{model_spec.get('in_channels', defaults['in_channels'].default)} and image_size="
                                 f"{model_spec.get('image_size', defaults['image_size'].default)}")
                    raise ValueError(f"stages[{index}].{key}: images of {image.shape[0]} channel(s), "
                                     f"{image.shape[1]}x{image.shape[2]}, do not fit the model "
                                     f"({str(err).splitlines()[0]}){takes}; expected channels and size to match it") \
                        from None
    finally:
        model.train(was_training)


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
    output_dir = config["output_dir"]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir: {output_dir} is a file; expected a directory (created when missing)")
    stages = build_stages(config)
    model = build_model(config["model"])
    _check_images_fit(model, config["model"], stages)
    runner = MultiStage(stages, output_dir)
    model = runner.run(model, resume=config.get("resume", True), change_config=config.get("change_config", False))
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
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message if args.config in message else f'config {args.config}: {message}'}", file=sys.stderr)
        return 2
    finally:  # under torchrun the Trainer joined the process group; leave it before the process exits
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
