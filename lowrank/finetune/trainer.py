"""One training loop for every strategy: mixed precision, gradient accumulation, clipping, per-epoch
evaluation, epoch checkpoints that resume exactly, and a JSON metrics log.

Determinism: every epoch reseeds the global RNGs and its shuffling generator from (seed, epoch),
so nothing random crosses an epoch boundary and a run resumed from an epoch checkpoint ends with
the same weights as one that was never interrupted (bit-exact on CPU). A crash loses at most the
epoch in progress.

Checkpoints (output_dir/checkpoint/) are safetensors plus JSON, never pickle:
    model.safetensors      the model's full state_dict
    optimizer.safetensors  the optimizer's tensor state
    trainer.json           epoch, step, history, optimizer param groups, grad scaler, strategy, key shapes
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from itertools import islice

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lowrank.finetune.strategies import FeatureExtraction, Strategy

__all__ = ["TrainConfig", "Trainer", "load_state", "save_state"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "cosine")
CHECKPOINT = "checkpoint"
METRICS = "metrics.json"


@dataclass
class TrainConfig:
    """Training hyperparameters. grad_accum micro-batches of batch_size make one optimizer step;
    amp: None, "bf16" or "fp16" (autocast; fp16 adds a gradient scaler); max_grad_norm clips the
    global norm of the trainable gradients; scheduler "cosine" decays to 0 after warmup_steps."""

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = None
    amp: str | None = None
    scheduler: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig: {name} must be a positive integer, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"TrainConfig: scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"TrainConfig: amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig: max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be positive, got {self.lr!r}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "train") -> TrainConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {known}")
        return cls(**values)


# ------------------------------------------------------------------------------------- state files


def save_state(state: dict[str, torch.Tensor], path: str) -> None:
    """A state_dict as safetensors (tensors cloned, so tied weights save too)."""
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, path, metadata={"format": "pt"})


def load_state(model: nn.Module, path: str, what: str) -> None:
    """Load a full state_dict saved by save_state, refusing one from another model with a clear message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    tensors = load_file(path)
    check_same_model(model, {k: list(v.shape) for k, v in tensors.items()}, f"{what} {path}")
    model.load_state_dict(tensors)


def check_same_model(model: nn.Module, saved_shapes: dict[str, list[int]], what: str) -> None:
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(saved_shapes)), sorted(set(saved_shapes) - set(own))
    reshaped = sorted(k for k in set(own) & set(saved_shapes) if own[k] != saved_shapes[k])
    if missing or unexpected or reshaped:
        details = [f"{label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for label, keys in
                   (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped)) if keys]
        raise ValueError(f"{what} was saved from another model ({'; '.join(details)})")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _split_batch(batch):
    """(inputs, targets) from a (inputs, targets) pair or a dict with "labels"."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError("Trainer: a dict batch needs a 'labels' entry")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"Trainer: a batch must be (inputs, targets) or a dict with 'labels', got {type(batch).__name__}")


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _batch_size(targets: torch.Tensor) -> int:
    return targets.shape[0]


class Trainer:
    """Train `model` with `strategy` (see lowrank.finetune.strategies) on `train_data`.

    Batches are (inputs, targets) or dicts of model inputs with "labels"; the model returns logits
    (or an object with .logits). `loss_fn(logits, targets)` returns the loss summed over the batch
    (default: cross-entropy), so micro-batches of any size add up to the full batch's mean.
    With output_dir, each epoch writes a checkpoint and metrics.json there, and fit() resumes
    from the checkpoint it finds.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, train_data: Dataset, eval_data: Dataset | None = None,
                 config: TrainConfig | None = None, output_dir: str | os.PathLike | None = None, loss_fn=None):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"Trainer: strategy must be a lowrank.finetune Strategy, got {type(strategy).__name__}")
        self.config = config or TrainConfig()
        self.strategy, self.train_data, self.eval_data = strategy, train_data, eval_data
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.loss_fn = loss_fn or (lambda logits, targets: F.cross_entropy(logits.float(), targets, reduction="sum"))
        self.device = torch.device(self.config.device)
        torch.manual_seed(self.config.seed)  # the strategy's new modules start the same every run
        self.model = strategy.prepare(model).to(self.device)
        groups = strategy.param_groups(self.model, self.config.lr)
        for group in groups:
            group["base_lr"] = group["lr"]
        self.trainable_parameters = sum(p.numel() for g in groups for p in g["params"])
        if self.config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.config.lr, momentum=self.config.momentum,
                                             weight_decay=self.config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        self.epoch, self.step, self.history = 0, 0, []

    # ---------------------------------------------------------------------------------- schedule

    def _steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.train_data) / self.config.batch_size) / self.config.grad_accum)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.scheduler == "constant":
            return 1.0
        total = max(1, c.epochs * self._steps_per_epoch() - c.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - c.warmup_steps) / total)))

    def _autocast(self):
        dtype = AMP_DTYPES.get(self.config.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    # ------------------------------------------------------------------------------------- loops

    def _forward(self, module: nn.Module, inputs) -> torch.Tensor:
        return _logits(module(**inputs) if isinstance(inputs, dict) else module(inputs))

    def _train_epoch(self, module: nn.Module, data: Dataset, epoch: int) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        generator = torch.Generator().manual_seed(_epoch_seed(c.seed, epoch))
        torch.manual_seed(_epoch_seed(c.seed, epoch))  # dropout and anything else random in the epoch
        batches = iter(DataLoader(data, batch_size=c.batch_size, shuffle=True, generator=generator))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(total=self._steps_per_epoch(), desc=f"epoch {epoch + 1}/{c.epochs}", disable=not c.progress,
                   leave=False)
        while window := list(islice(batches, c.grad_accum)):
            window = [_split_batch(_to(b, self.device)) for b in window]
            count = sum(_batch_size(targets) for _, targets in window)
            for inputs, targets in window:
                with self._autocast():
                    logits = self._forward(module, inputs)
                    loss = self.loss_fn(logits, targets)
                self.scaler.scale(loss / count).backward()
                total_loss += loss.item()
                correct += int((logits.argmax(-1) == targets).sum())
            seen += count
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * self._lr_factor(self.step)
            if c.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], c.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    @torch.no_grad()
    def evaluate(self, module: nn.Module | None = None, data: Dataset | None = None) -> dict:
        """Mean loss and accuracy of `module` (default: the model) on `data` (default: eval_data)."""
        module = self.model if module is None else module
        data = self.eval_data if data is None else data
        was_training = module.training
        module.eval()
        total_loss, correct, seen = 0.0, 0, 0
        for batch in DataLoader(data, batch_size=self.config.eval_batch_size):
            inputs, targets = _split_batch(_to(batch, self.device))
            with self._autocast():
                logits = self._forward(module, inputs)
            total_loss += self.loss_fn(logits, targets).item()
            correct += int((logits.argmax(-1) == targets).sum())
            seen += _batch_size(targets)
        module.train(was_training)
        return {"eval_loss": total_loss / max(seen, 1), "eval_accuracy": correct / max(seen, 1)}

    @torch.no_grad()
    def _cached(self, data: Dataset) -> TensorDataset:
        """The head's inputs for every sample of `data`, with the targets (FeatureExtraction caching)."""
        features, labels = [], []
        for batch in DataLoader(data, batch_size=self.config.eval_batch_size):
            inputs, targets = _split_batch(_to(batch, self.device))
            if isinstance(inputs, dict):
                raise ValueError("FeatureExtraction: cache_features needs (inputs, targets) batches")
            with self._autocast():
                features.append(self.strategy.features(self.model, inputs).float())
            labels.append(targets)
        return TensorDataset(torch.cat(features), torch.cat(labels))

    def fit(self, resume: bool = True) -> nn.Module:
        """Train for config.epochs (continuing from output_dir's checkpoint when resume) and return the model."""
        if resume and self.output_dir is not None:
            self._load_checkpoint()
        module, train_data, eval_data = self.model, self.train_data, self.eval_data
        caching = isinstance(self.strategy, FeatureExtraction) and self.strategy.cache_features
        if caching and self.epoch < self.config.epochs:
            module = self.strategy._head_module(self.model)
            train_data = self._cached(self.train_data)
            eval_data = None if eval_data is None else self._cached(eval_data)
        for epoch in range(self.epoch, self.config.epochs):
            started = time.perf_counter()
            self.strategy.on_epoch_start(self.model, epoch)
            self.strategy.set_train_mode(self.model)
            record = {"epoch": epoch + 1, **self._train_epoch(module, train_data, epoch)}
            if eval_data is not None:
                record.update(self.evaluate(module, eval_data))
            record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            self.epoch = epoch + 1
            if self.output_dir is not None:
                self._save_checkpoint()
                self._write_metrics()
        self.model.eval()
        return self.model

    # ------------------------------------------------------------------------------ checkpoints

    def _fingerprint(self) -> dict:
        return {k: list(v.shape) for k, v in self.model.state_dict().items()}

    def _save_checkpoint(self) -> None:
        final = os.path.join(self.output_dir, CHECKPOINT)
        tmp, old = final + ".tmp", final + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_state(self.model.state_dict(), os.path.join(tmp, "model.safetensors"))
        optim = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, entry in optim["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value
                else:
                    scalars[f"{index}.{key}"] = value
        save_state(tensors, os.path.join(tmp, "optimizer.safetensors"))
        meta = {
            "epoch": self.epoch, "step": self.step, "history": self.history,
            "param_groups": optim["param_groups"], "optimizer_scalars": scalars,
            "scaler": self.scaler.state_dict(), "strategy": self.strategy.config(),
            "config": asdict(self.config), "model_keys": self._fingerprint(),
        }
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        directory = os.path.join(self.output_dir, CHECKPOINT)
        if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
            directory += ".old"  # a crash between the two renames of _save_checkpoint
        if not os.path.isdir(directory):
            return
        with open(os.path.join(directory, "trainer.json")) as f:
            meta = json.load(f)
        where = f"checkpoint {directory}"
        if meta["strategy"] != json.loads(json.dumps(self.strategy.config())):
            raise ValueError(f"{where} was written with strategy {meta['strategy']}, this run uses "
                             f"{self.strategy.config()}; use another output_dir or resume=False")
        check_same_model(self.model, meta["model_keys"], where)
        load_state(self.model, os.path.join(directory, "model.safetensors"), where)
        state: dict[int, dict] = {}
        for key, value in load_file(os.path.join(directory, "optimizer.safetensors")).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value.to(self.device)
        for key, value in meta["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]

    def _write_metrics(self) -> None:
        log = {"strategy": self.strategy.config(), "config": asdict(self.config),
               "trainable_parameters": self.trainable_parameters, "epochs": self.history}
        path = os.path.join(self.output_dir, METRICS)
        with open(path + ".tmp", "w") as f:
            json.dump(log, f, indent=1)
        os.replace(path + ".tmp", path)
