"""One training loop for every strategy: mixed precision, gradient accumulation, clipping, per-epoch
evaluation, epoch checkpoints that resume exactly, and a JSON metrics log.

Determinism: every epoch reseeds the global RNGs and its shuffling generator from (seed, epoch),
so nothing random crosses an epoch boundary and a run resumed from an epoch checkpoint ends with
the same weights as one that was never interrupted (bit-exact on CPU). A crash loses at most the
epoch in progress.

Checkpoints (output_dir/checkpoint/) are safetensors plus JSON, never pickle:
    model.safetensors      the trained tensors: the full state_dict for full fine-tuning; for the
                           parameter-efficient strategies (Strategy.checkpoint_trained_only) only the
                           parameters the optimizer updates and the buffers, not the frozen base
    optimizer.safetensors  the optimizer's tensor state
    trainer.json           epoch, step, history, optimizer param groups, grad scaler, strategy, the
                           TrainConfig and its segments, the model's key shapes, a fingerprint
                           (float64 sums) of every frozen tensor that model.safetensors leaves out,
                           the sha256 of each tensor file, and backend="auto"'s picks
Resuming checks all of it, naming the checkpoint: the tensor files' hashes (a damaged file is
refused), the key shapes and the frozen fingerprint (a checkpoint from another model or from
another pre-trained base of the same architecture is refused), and the TrainConfig: a field that
changes the result (anything but progress and eval_batch_size, and epochs under a constant
schedule) must be as it was, unless fit(change_config=True) continues under the new one, which
metrics.json then records as a new segment. auto's picks are pinned again (lowrank.autotune), so
a resumed run uses the backends the interrupted one measured and its numbers match bit for bit.

Distributed (config.distributed "ddp" or "fsdp", launched by torchrun; see docs/finetune.md, "Distributed"):
every rank shuffles the data alike and trains on its contiguous slice of each global batch of
config.batch_size samples (which must divide by the world size); the loss is scaled by
world_size / (samples in the optimizer step), so the averaged gradient is the single-process
gradient of the same global batches, with accumulation (gradients are reduced once per step) and
a short last batch. "ddp" wraps the module that trains in DistributedDataParallel, which reduces
only parameters with requires_grad (rebuilt when gradual unfreezing changes that set); "fsdp"
(LoRA and Adapters) shards the model with FSDP2's fully_shard, one unit per repeated block plus
the root: frozen weights are sharded and all-gathered for compute but never reduce-scattered.
Losses and accuracies are summed over ranks, rank 0 alone writes checkpoints and metrics (the
others wait), and every rank reads the checkpoint to resume. Dropout draws differ per rank, so
only runs without dropout match a single process exactly.
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
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset

from lowrank import autotune
from lowrank._files import read_json, read_tensors, require_fields, write_tensors
from lowrank.finetune import distributed
from lowrank.finetune.strategies import Adapters, FeatureExtraction, LoRA, Strategy

__all__ = ["TrainConfig", "Trainer", "load_state", "save_state"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "cosine")
DISTRIBUTED = ("ddp", "fsdp")
CHECKPOINT = "checkpoint"
METRICS = "metrics.json"
MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.safetensors", "trainer.json"
_META_FIELDS = {"epoch": int, "step": int, "history": list, "param_groups": list, "optimizer_scalars": dict,
                "scaler": dict, "strategy": dict, "config": dict, "segments": list, "model_keys": dict,
                "frozen_fingerprint": dict, "sha256": dict, "autotune": list}


@dataclass
class TrainConfig:
    """Training hyperparameters. grad_accum micro-batches of batch_size make one optimizer step;
    amp: None, "bf16" or "fp16" (autocast; fp16 adds a gradient scaler); max_grad_norm clips the
    global norm of the trainable gradients; scheduler "cosine" decays to 0 after warmup_steps.
    distributed: None, "ddp" or "fsdp" (under torchrun; batch_size is then the global batch)."""

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
    distributed: str | None = None

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
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig: {name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is None and name == "max_grad_norm":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig: {name} must be a finite number, got {value!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig: max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be positive, got {self.lr!r}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig: momentum and weight_decay must be >= 0, got {self.momentum!r} and "
                             f"{self.weight_decay!r}")
        self._check_device()
        if self.distributed is not None and self.distributed not in DISTRIBUTED:
            raise ValueError(f"TrainConfig: distributed must be None, 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.distributed == "fsdp" and self.amp == "fp16":
            raise ValueError("TrainConfig: distributed='fsdp' does not support amp='fp16' (its gradient scaler would "
                             "skip steps on some ranks only); use amp='bf16'")

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"TrainConfig: device must name a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                             f"got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig: device {self.device!r}, but no CUDA device is visible to torch; "
                             "expected 'cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"TrainConfig: device {self.device!r}, but torch sees {torch.cuda.device_count()} "
                             "CUDA device(s)")

    @classmethod
    def from_dict(cls, values: dict, where: str = "train") -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping of TrainConfig fields, got {values!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {known}")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


# Fields that never change the trained weights: what is shown, and how evaluation is batched.
_RESULT_NEUTRAL = ("progress", "eval_batch_size")


def result_changes(saved: dict, own: dict) -> list[str]:
    """The TrainConfig fields (as dicts) in which `own` differs from `saved` in a way that changes
    the trained weights. epochs does only under a cosine schedule: a constant one continues a run
    into more epochs exactly as a longer run would have trained them."""
    neutral = set(_RESULT_NEUTRAL)
    if saved.get("scheduler") == own["scheduler"] == "constant":
        neutral.add("epochs")
    return [name for name in own if name not in neutral and (name not in saved or saved[name] != own[name])]


# ------------------------------------------------------------------------------------- state files


def save_state(state: dict[str, torch.Tensor], path: str) -> str:
    """A state_dict as safetensors (tensors cloned, so tied weights save too); returns its sha256."""
    return write_tensors(path, {k: v.detach().clone() for k, v in state.items()})


def load_state(model: nn.Module, path: str, what: str) -> None:
    """Load a full state_dict saved by save_state, refusing a damaged file or one from another model."""
    tensors = read_tensors(path, what)
    check_same_model(key_shapes(model), {k: list(v.shape) for k, v in tensors.items()}, f"{what} {path}")
    model.load_state_dict(tensors)


def key_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def check_same_model(own: dict[str, list[int]], saved_shapes: dict[str, list[int]], what: str) -> None:
    """Refuse saved_shapes (state_dict key -> shape) unless they are exactly `own`'s."""
    missing, unexpected = sorted(set(own) - set(saved_shapes)), sorted(set(saved_shapes) - set(own))
    reshaped = sorted(k for k in set(own) & set(saved_shapes) if own[k] != saved_shapes[k])
    if missing or unexpected or reshaped:
        details = [f"{label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for label, keys in
                   (("missing", missing), ("unexpected", unexpected), ("different shape", reshaped)) if keys]
        raise ValueError(f"{what} was saved from another model ({'; '.join(details)})")


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch + rank * 2**40) % (2**63)


def frozen_fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """[sum, sum of |x|, sum of x²] in float64 of each tensor: tells one pre-trained base from another cheaply."""
    fingerprint = {}
    for key, value in state.items():
        value = value.detach()  # reduced in float64 without a float64 copy of the (possibly large) tensor
        norm = torch.linalg.vector_norm(value, dtype=torch.float64).item()
        fingerprint[key] = [value.sum(dtype=torch.float64).item(), value.abs().sum(dtype=torch.float64).item(),
                            norm * norm]
    return fingerprint


def _differing(own: dict[str, list[float]], saved: dict[str, list[float]]) -> list[str]:
    """Keys whose fingerprints differ beyond float64 summation-order noise (another device sums in another order)."""
    def same(a: list[float], b: list[float]) -> bool:
        tolerance = 1e-9 * (1 + a[1] + a[2])
        return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))

    return sorted(k for k in set(own) | set(saved) if k not in own or k not in saved or not same(own[k], saved[k]))


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
    from the checkpoint it finds. With config.distributed, every rank constructs the Trainer with
    the same arguments and calls fit() (see the module docstring); under "fsdp" the returned
    model's parameters are sharded DTensors.
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
        self.rank, self.world_size = 0, 1
        if self.config.distributed is not None:
            self._check_distributed(strategy)
            self.device = distributed.init_distributed(self.device)
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if self.config.batch_size % self.world_size:
                raise ValueError(f"TrainConfig: batch_size {self.config.batch_size} is the global batch and must "
                                 f"divide by the world size {self.world_size}")
        torch.manual_seed(self.config.seed)  # the strategy's new modules start the same every run
        self.model = strategy.prepare(model).to(self.device)
        if self.config.distributed is not None:
            self._broadcast_from_rank0()
        groups = strategy.param_groups(self.model, self.config.lr)
        self._model_keys = key_shapes(self.model)
        self._checkpoint_keys = self._keys_to_save(groups)
        # Only checkpoints use it, and it reads every frozen weight: skipped without an output_dir.
        self._frozen_fingerprint = None if self.output_dir is None else frozen_fingerprint(
            {k: v for k, v in self.model.state_dict().items() if k not in self._checkpoint_keys})
        if self.config.distributed == "fsdp":
            distributed.fully_shard_model(self.model, self.device)
            groups = strategy.param_groups(self.model, self.config.lr)  # the sharded parameters
        self._ddp, self._ddp_trainable = None, None
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
        self.segments = [{"first_epoch": 1, "config": self._config_record()}]

    def _config_record(self) -> dict:
        return json.loads(json.dumps(asdict(self.config)))

    # ------------------------------------------------------------------------------ distributed

    def _check_distributed(self, strategy: Strategy) -> None:
        if self.config.distributed == "fsdp" and not isinstance(strategy, (LoRA, Adapters)):
            raise ValueError(f"TrainConfig: distributed='fsdp' supports the lora and adapters strategies, not "
                             f"{strategy.name!r}; use distributed='ddp'")

    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        """Every rank starts from rank 0's weights (DDP does this itself; FSDP2 would mix the ranks' shards)."""
        for tensor in self.model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    def _keys_to_save(self, groups: list[dict]) -> set[str]:
        """The state_dict keys a checkpoint holds: every key, or the trained parameters and the buffers."""
        state = self.model.state_dict(keep_vars=True)
        if not self.strategy.checkpoint_trained_only:
            return set(state)
        kept = {id(p) for g in groups for p in g["params"]} | {id(b) for b in self.model.buffers()}
        return {k for k, v in state.items() if id(v) in kept}

    def _parallel(self, module: nn.Module) -> nn.Module:
        """The module that trains this epoch: under "ddp" wrapped in DistributedDataParallel, rebuilt when
        its set of trainable parameters changed (DDP's reducer only knows those present when it was built)."""
        if self.config.distributed != "ddp":
            return module
        trainable = [name for name, p in module.named_parameters() if p.requires_grad]
        if self._ddp is None or self._ddp.module is not module or self._ddp_trainable != trainable:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = None if self.device.type == "cpu" else [self.device]
            self._ddp, self._ddp_trainable = DistributedDataParallel(module, device_ids=device_ids), trainable
        return self._ddp

    def _rank_loader(self, data: Dataset, batch_size: int, order) -> DataLoader:
        """This rank's slice of each global batch of `order` (all of it in a single process)."""
        batches = BatchSampler(order, batch_size, drop_last=False)
        if self.world_size > 1:
            batches = distributed.RankBatches(batches, self.rank, self.world_size)
        return DataLoader(data, batch_sampler=batches)

    @staticmethod
    def _global_batch_sizes(size: int, batch_size: int) -> list[int]:
        """Sizes of the batches of `batch_size` that `size` samples fall into, the last one short."""
        return [min(batch_size, size - start) for start in range(0, size, batch_size)]

    def _own_size(self, global_size: int) -> int:
        """Samples of a global batch that this rank trains on (0: it runs a placeholder sample weighted 0)."""
        start, stop = distributed.shard_bounds(global_size, self.rank, self.world_size)
        return stop - start

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        return values if self.world_size == 1 else distributed.all_reduce_sum(values, self.device)

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
        generator = torch.Generator().manual_seed(_epoch_seed(c.seed, epoch))  # the same order on every rank
        torch.manual_seed(_epoch_seed(c.seed, epoch, self.rank))  # dropout and anything else random in the epoch
        loader = self._rank_loader(data, c.batch_size, RandomSampler(data, generator=generator))
        batches = zip(self._global_batch_sizes(len(data), c.batch_size), loader)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(total=self._steps_per_epoch(), desc=f"epoch {epoch + 1}/{c.epochs}",
                   disable=not c.progress or self.rank != 0, leave=False)
        while window := list(islice(batches, c.grad_accum)):
            count = sum(global_size for global_size, _ in window)  # samples in this optimizer step, on all ranks
            for index, (global_size, batch) in enumerate(window):
                inputs, targets = _split_batch(_to(batch, self.device))
                own = self._own_size(global_size)
                with distributed.gradient_sync(module, sync=index == len(window) - 1):
                    with self._autocast():
                        logits = self._forward(module, inputs)
                        loss = self.loss_fn(logits, targets)
                    # ranks' gradients are averaged: world_size / count makes the average the global batch's mean
                    self.scaler.scale((loss if own else loss * 0) * self.world_size / count).backward()
                if own:
                    total_loss += loss.item()
                    correct += int((logits.argmax(-1) == targets).sum())
                    seen += own
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
            bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}", acc=f"{correct / max(seen, 1):.3f}")
        bar.close()
        total_loss, correct, seen = self._sum_over_ranks([total_loss, correct, seen])
        return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    @torch.no_grad()
    def evaluate(self, module: nn.Module | None = None, data: Dataset | None = None) -> dict:
        """Mean loss and accuracy of `module` (default: the model) on `data` (default: eval_data).
        Distributed: every rank calls it and evaluates its slice of each batch; the results are global."""
        module = self.model if module is None else module
        data = self.eval_data if data is None else data
        was_training = module.training
        module.eval()
        total_loss, correct, seen = 0.0, 0, 0
        loader = self._rank_loader(data, self.config.eval_batch_size, SequentialSampler(data))
        for global_size, batch in zip(self._global_batch_sizes(len(data), self.config.eval_batch_size), loader):
            inputs, targets = _split_batch(_to(batch, self.device))
            with self._autocast():
                logits = self._forward(module, inputs)  # also for a placeholder: FSDP's all-gathers need every rank
            if self._own_size(global_size):
                total_loss += self.loss_fn(logits, targets).item()
                correct += int((logits.argmax(-1) == targets).sum())
                seen += _batch_size(targets)
        module.train(was_training)
        total_loss, correct, seen = self._sum_over_ranks([total_loss, correct, seen])
        return {"eval_loss": total_loss / max(seen, 1), "eval_accuracy": correct / max(seen, 1)}

    @torch.no_grad()
    def _cached(self, data: Dataset) -> TensorDataset:
        """The head's inputs for every sample of `data`, with the targets (FeatureExtraction caching).
        Distributed: each rank runs the backbone on ceil(n / world_size) samples (wrapping around) and
        the ranks exchange the results."""
        own = data
        if self.world_size > 1:
            per_rank = math.ceil(len(data) / self.world_size)
            own = Subset(data, [(self.rank * per_rank + i) % len(data) for i in range(per_rank)])
        head_dtype = next(self.strategy._head_module(self.model).parameters()).dtype  # autocast may return less
        features, labels = [], []
        for batch in DataLoader(own, batch_size=self.config.eval_batch_size):
            inputs, targets = _split_batch(_to(batch, self.device))
            if isinstance(inputs, dict):
                raise ValueError("FeatureExtraction: cache_features needs (inputs, targets) batches")
            with self._autocast():
                features.append(self.strategy.features(self.model, inputs).to(head_dtype))
            labels.append(targets)
        features, labels = torch.cat(features), torch.cat(labels)
        if self.world_size > 1:
            features, labels = distributed.gather_rows(features, len(data)), distributed.gather_rows(labels, len(data))
        return TensorDataset(features, labels)

    def fit(self, resume: bool = True, change_config: bool = False) -> nn.Module:
        """Train for config.epochs (continuing from output_dir's checkpoint when resume) and return the model.
        change_config: continue a checkpoint written under a TrainConfig that differs in a field that
        changes the result (refused otherwise), as a new segment of metrics.json."""
        if resume and self.output_dir is not None:
            self._load_checkpoint(change_config)
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
            record = {"epoch": epoch + 1, **self._train_epoch(self._parallel(module), train_data, epoch)}
            if eval_data is not None:
                record.update(self.evaluate(module, eval_data))
            record["seconds"] = time.perf_counter() - started
            self.history.append(record)
            self.epoch = epoch + 1
            if self.output_dir is not None:
                self._save_checkpoint()
                if self.rank == 0:
                    self._write_metrics()
        self.model.eval()
        return self.model

    # ------------------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        """Every rank calls it (FSDP2 shards are gathered collectively); rank 0 writes, the others wait."""
        model_state = {k: distributed.full_tensor(v) for k, v in self.model.state_dict().items()
                       if k in self._checkpoint_keys}
        optim = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, entry in optim["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = distributed.full_tensor(value)
                else:
                    scalars[f"{index}.{key}"] = value
        if self.rank == 0:
            self._write_checkpoint(model_state, tensors, {
                "epoch": self.epoch, "step": self.step, "history": self.history,
                "param_groups": optim["param_groups"], "optimizer_scalars": scalars,
                "scaler": self.scaler.state_dict(), "strategy": self.strategy.config(),
                "config": self._config_record(), "segments": self.segments, "model_keys": self._model_keys,
                "frozen_fingerprint": self._frozen_fingerprint, "autotune": autotune.records(),
            })
        distributed.barrier()

    def _write_checkpoint(self, model_state: dict, optimizer_tensors: dict, meta: dict) -> None:
        final = os.path.join(self.output_dir, CHECKPOINT)
        tmp, old = final + ".tmp", final + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta["sha256"] = {name: save_state(state, os.path.join(tmp, name))
                          for name, state in ((MODEL_FILE, model_state), (OPTIMIZER_FILE, optimizer_tensors))}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _read_meta(self, directory: str) -> dict:
        """trainer.json of the checkpoint in `directory`, every field present, of its type and consistent."""
        where, path = f"checkpoint {directory}", os.path.join(directory, META_FILE)
        meta = read_json(path, where)
        require_fields(where, path, meta, _META_FIELDS)
        require_fields(where, path, meta["sha256"], {MODEL_FILE: str, OPTIMIZER_FILE: str})
        if meta["epoch"] < 0 or meta["step"] < 0 or len(meta["history"]) != meta["epoch"]:
            raise ValueError(f"{where}: {path} has epoch={meta['epoch']}, step={meta['step']} and "
                             f"{len(meta['history'])} history record(s); expected epoch >= 0, step >= 0 and one "
                             "record per epoch")
        return meta

    def _load_checkpoint(self, change_config: bool) -> None:
        directory = os.path.join(self.output_dir, CHECKPOINT)
        if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
            directory += ".old"  # a crash between the two renames of _save_checkpoint
        if not os.path.isdir(directory):
            return
        meta = self._read_meta(directory)
        where = f"checkpoint {directory}"
        if meta["strategy"] != json.loads(json.dumps(self.strategy.config())):
            raise ValueError(f"{where} was written with strategy {meta['strategy']}, this run uses "
                             f"{self.strategy.config()}; use another output_dir or resume=False")
        check_same_model(self._model_keys, meta["model_keys"], where)
        changed = _differing(self._frozen_fingerprint, meta["frozen_fingerprint"])
        if changed:
            raise ValueError(f"{where} was trained on another pre-trained base: the frozen tensor(s) "
                             f"{changed[:5]}{' ...' if len(changed) > 5 else ''} differ from this model's; "
                             "load the base it was trained from, or use another output_dir or resume=False")
        own_config = self._config_record()
        differing = result_changes(meta["config"], own_config)
        if differing and not change_config:
            shown = ", ".join(f"{name} {meta['config'].get(name)!r} -> {own_config[name]!r}" for name in differing)
            raise ValueError(f"{where} was written under another TrainConfig ({shown}), which changes the result; "
                             "resume with the checkpoint's values, or pass fit(change_config=True) (CLI: "
                             "change_config: true) to continue under the new ones as a new segment of "
                             "metrics.json, or start over with resume=False or another output_dir")
        model_file = os.path.join(directory, MODEL_FILE)
        tensors = read_tensors(model_file, where, meta["sha256"][MODEL_FILE])
        if set(tensors) != self._checkpoint_keys:
            raise ValueError(f"{where}: {model_file} holds the tensors {sorted(tensors)[:5]}..., expected exactly "
                             f"{sorted(self._checkpoint_keys)[:5]}... ({len(self._checkpoint_keys)} tensors)")
        optimizer_tensors = read_tensors(os.path.join(directory, OPTIMIZER_FILE), where, meta["sha256"][OPTIMIZER_FILE])
        autotune.pin(meta["autotune"], where)
        own = self.model.state_dict()
        for key, value in tensors.items():
            distributed.copy_into(own[key], value)
        segment = {"first_epoch": meta["epoch"] + 1, "config": own_config,
                   "changed": {name: [meta["config"].get(name), own_config[name]] for name in own_config
                               if meta["config"].get(name) != own_config[name] and name != "progress"}}
        if meta["config"].get("optimizer") == self.config.optimizer:
            self._load_optimizer(meta, optimizer_tensors, new_hyperparameters=bool(segment["changed"]))
        else:  # another optimizer's state means nothing to this one: it starts afresh
            segment["optimizer_state"] = "reset"
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step, self.history = meta["epoch"], meta["step"], meta["history"]
        self.segments = meta["segments"] + ([segment] if segment["changed"] else [])

    def _load_optimizer(self, meta: dict, tensors: dict[str, torch.Tensor], new_hyperparameters: bool) -> None:
        """The optimizer's state from the checkpoint; its param groups' hyperparameters from this run's
        config when they changed."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            # per-element state (moments, momentum) is sharded like its parameter under FSDP2
            state.setdefault(int(index), {})[name] = distributed.shard_like(value.to(self.device), params[int(index)])
        for key, value in meta["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["param_groups"]]
        if new_hyperparameters:
            groups = [{**own, "params": saved["params"]}
                      for own, saved in zip(self.optimizer.state_dict()["param_groups"], groups, strict=True)]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _write_metrics(self) -> None:
        log = {"strategy": self.strategy.config(), "config": asdict(self.config), "segments": self.segments,
               "trainable_parameters": self.trainable_parameters, "epochs": self.history}
        path = os.path.join(self.output_dir, METRICS)
        with open(path + ".tmp", "w") as f:
            json.dump(log, f, indent=1)
        os.replace(path + ".tmp", path)
