"""Unsupervised domain adaptation methods on one shared encoder/classifier per task.

    method = DANN("mnist-usps", seed=0)
    method.fit(source_loader, target_loader)   # source batches (x, y); target batches x or (x, ...)
    accuracy = method.evaluate(target_test_loader)

Methods: SourceOnly, DANN (Ganin & Lempitsky 2015), ADDA (Tzeng et al. 2017), DomainConfusion
(Tzeng et al. 2015), CoGAN (Liu & Tuzel 2016). Target labels are never read during fit: only the first element of a
target batch is used.

Training runs for a fixed number of steps (each method's `phases`); it is deterministic under
`seed` on the CPU: the modules are initialised, and dropout and any loader that shuffles from
torch's global generator draw from, a private generator stream seeded by `seed`, so the caller's
global RNG state is neither used nor changed. save_checkpoint / load_checkpoint store every
module, optimiser, schedule, the RNG state and each loader's position (its epoch-start RNG
states and how many batches were taken), so fit after load_checkpoint continues exactly where
an uninterrupted run would be. Checkpoints are torch.save files of tensors and plain values
only, read with weights_only=True.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lowrank import _backends
from lowrank.da.models import LeNetEncoder, build_network, check_feature_sizes
from lowrank.da.tasks import Task, get_task
from lowrank.nn import DANNLambdaScheduler, GradientReversal

__all__ = ["DAMethod", "SourceOnly", "DANN", "ADDA", "DomainConfusion", "CoGAN", "METHODS", "TASK_DEFAULTS",
           "make_method", "check_hyperparameters"]

CHECKPOINT_FORMAT = "lowrank.da checkpoint 1"

# A task's own overrides of a method's defaults. On MNIST->MNIST-M DANN gets 11000 steps: at 2000
# it has not aligned the domains (docs/domain-adaptation.md).
TASK_DEFAULTS = {"mnist-mnistm": {"dann": {"steps": 11000}}}


def check_hyperparameters(owner: str, defaults: dict, values: dict) -> None:
    """Refuse a hyper-parameter of another type than its default or out of its range: counts are
    integers >= 1 (the steps of one phase of several, <name>_steps, >= 0), learning rates > 0, momentum
    and Adam betas in [0, 1), other numbers finite and >= 0; a backend is None or a backend's name."""
    for name, value in values.items():
        default = defaults[name]
        if default is None:
            _backends.check_name(f"{owner}: {name}", value)
        elif isinstance(default, int):
            least = 0 if name.endswith("_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{owner}: {name} must be an integer of at least {least}, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
            if name.endswith("lr") and not value > 0:
                raise ValueError(f"{owner}: {name} (a learning rate) must be positive, got {value!r}")
            if ("beta" in name or name == "momentum") and not 0 <= value < 1:
                raise ValueError(f"{owner}: {name} must lie in [0, 1), got {value!r}")
            if value < 0:
                raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")


class _Cycle:
    """Endless batches from a loader, epoch after epoch, restartable at (epoch, position).

    Before each epoch's iterator is made it records the RNG states that shuffling may draw
    from (torch's global generator, the loader's and its sampler's generators); restoring them,
    making the iterator and skipping `position` batches puts a resumed run on the same batch.
    """

    def __init__(self, loader, what: str):
        if loader is None:
            raise ValueError(f"fit: the {what} loader is None")
        self.loader, self.what = loader, what
        self.epoch, self.position, self.epoch_state, self.iterator = 0, 0, None, None

    def _generators(self) -> list:
        found = []
        for owner in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None),
                      getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found

    def _start_epoch(self) -> None:
        self.epoch_state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in self._generators()]}
        self.iterator = iter(self.loader)
        self.position = 0

    def next(self):
        if self.iterator is None:
            self._start_epoch()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ValueError(f"fit: the {self.what} loader yields no batches") from None
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "epoch_state": self.epoch_state}

    def load_state_dict(self, state: dict) -> None:
        """Replay the loader to the saved position; the caller restores the RNG state afterwards."""
        self.epoch, self.epoch_state = state["epoch"], state["epoch_state"]
        if self.epoch_state is None:
            return
        generators = self._generators()
        if len(generators) != len(self.epoch_state["generators"]):
            raise ValueError(f"load_checkpoint: the {self.what} loader has {len(generators)} generators but the "
                             f"checkpoint recorded {len(self.epoch_state['generators'])}: not the same kind of loader")
        torch.set_rng_state(self.epoch_state["torch"])
        for generator, saved in zip(generators, self.epoch_state["generators"]):
            generator.set_state(saved)
        self.iterator = iter(self.loader)
        for _ in range(state["position"]):
            next(self.iterator)
        self.position = state["position"]


def _progress_bar(enabled: bool, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not enabled:
            return _NoBar()
        raise ImportError("lowrank.da progress bars need tqdm: pip install tqdm, or pass progress=False") from None
    return tqdm(disable=not enabled, **kwargs)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, values):
        pass

    def close(self):
        pass


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class DAMethod:
    """Base class: a seeded, checkpointable training loop over `phases` [(name, steps)].

    Subclasses set `name`, `defaults` (hyper-parameters; TASK_DEFAULTS, then constructor keywords
    override them), build their modules and optimisers in `_build`, and implement
    `_train_step(phase, source, target)` (pulling batches from the _Cycle objects it needs,
    returning a dict of floats) and `_predict(x)` (target-domain class logits).
    """

    name = "base"
    defaults: dict = {}

    def __init__(self, task="mnist-usps", *, seed: int = 0, encoder: Optional[nn.Module] = None,
                 classifier: Optional[nn.Module] = None, discriminator: Optional[nn.Module] = None,
                 checkpoint_path: Optional[str] = None, checkpoint_every: int = 0,
                 log_path: Optional[str] = None, log_every: int = 50, progress: bool = True, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyper-parameter(s) {unknown}; "
                            f"it takes {sorted(self.defaults)}")
        check_hyperparameters(type(self).__name__, self.defaults, hparams)
        self.task: Task = get_task(task)
        self.seed = int(seed)
        self.hparams = {**self.defaults, **TASK_DEFAULTS.get(self.task.name, {}).get(self.name, {}), **hparams}
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, int(checkpoint_every)
        self.log_path, self.log_every, self.progress = log_path, max(int(log_every), 1), progress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder = encoder if encoder is not None else build_network(
                self.task.network, "encoder", self.task.channels, self.task.image_size)
            if not isinstance(getattr(self.encoder, "out_features", None), int):
                raise ValueError(f"{type(self).__name__}: the encoder must have an integer `out_features` attribute "
                                 "(its feature size), as LeNetEncoder has")
            self.classifier = classifier if classifier is not None else build_network(
                self.task.network, "classifier", in_features=self.encoder.out_features)
            check_feature_sizes(type(self).__name__, self.encoder, classifier=self.classifier)
            self._build(discriminator)
            self._rng_state = torch.get_rng_state()
        self.step = 0
        self.history: list[dict] = []
        self._pending_cycles: Optional[dict] = None

    # ------------------------------------------------------------ subclass interface

    def _build(self, discriminator: Optional[nn.Module]) -> None:
        raise NotImplementedError

    @property
    def phases(self) -> list[tuple[str, int]]:
        """(phase name, steps) in training order; by default one adaptation phase of `steps` steps."""
        return [("adapt", self.hparams["steps"])]

    def _train_step(self, phase: str, source: _Cycle, target: _Cycle) -> dict:
        raise NotImplementedError

    def _modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "classifier": self.classifier}

    def _optimizers(self) -> dict:
        return {}

    def _schedulers(self) -> dict:
        return {}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for target-domain images, in eval mode (no dropout), without gradients."""
        self._set_train_mode(False)
        with torch.no_grad():
            return self._predict(x)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))

    # ------------------------------------------------------------ training

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.phases)

    def _phase_at(self, step: int) -> str:
        """The name of the phase that global step `step` belongs to."""
        start = 0
        for phase, steps in self.phases:
            start += steps
            if step < start:
                return phase
        raise IndexError(step)

    def fit(self, source_loader, target_loader) -> "DAMethod":
        """Train on labelled source batches (x, y) and unlabelled target batches (x or (x, ...))."""
        source, target = _Cycle(source_loader, "source"), _Cycle(target_loader, "target")
        running: dict[str, list[float]] = {}
        with torch.random.fork_rng(devices=[]):
            if self._pending_cycles is not None:
                source.load_state_dict(self._pending_cycles["source"])
                target.load_state_dict(self._pending_cycles["target"])
                self._pending_cycles = None
            torch.set_rng_state(self._rng_state)
            bar = _progress_bar(self.progress, total=self.total_steps, initial=self.step,
                                desc=f"{self.name} {self.task.name} seed {self.seed}", leave=False)
            try:
                while self.step < self.total_steps:
                    phase = self._phase_at(self.step)
                    self._set_train_mode(True)
                    record = self._train_step(phase, source, target)
                    self.step += 1
                    bar.update(1)
                    for key, value in record.items():
                        running.setdefault(key, []).append(value)
                    if self.step % self.log_every == 0 or self.step == self.total_steps:
                        entry = {"step": self.step, "phase": phase,
                                 **{k: sum(v) / len(v) for k, v in running.items()}}
                        self.history.append(entry)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in entry.items() if k not in ("step", "phase")})
                        running = {}
                    if self.checkpoint_path and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self._rng_state = torch.get_rng_state()
                        self.save_checkpoint(self.checkpoint_path, _cycles=(source, target))
            finally:
                bar.close()
            self._rng_state = torch.get_rng_state()
        self._set_train_mode(False)
        if self.log_path:
            self.write_log(self.log_path)
        return self

    def _set_train_mode(self, training: bool) -> None:
        for module in self._modules().values():
            module.train(training)

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Accuracy of predict() on a loader of (x, y) batches."""
        correct = total = 0
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"{type(self).__name__}.evaluate: batches must be (images, labels)")
            x, y = batch[0], batch[1]
            correct += (self.predict(x).argmax(1) == y).sum().item()
            total += y.numel()
        if total == 0:
            raise ValueError(f"{type(self).__name__}.evaluate: the loader yields no samples")
        return correct / total

    # ------------------------------------------------------------ log and checkpoints

    def config(self) -> dict:
        return {"method": self.name, "task": self.task.name, "seed": self.seed, "hparams": self.hparams}

    def write_log(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**self.config(), "step": self.step, "history": self.history}, indent=1))

    def save_checkpoint(self, path, _cycles=None) -> None:
        """Everything fit needs to continue; atomically replaces `path`."""
        state = {
            "format": CHECKPOINT_FORMAT, **self.config(), "step": self.step,
            "modules": {k: m.state_dict() for k, m in self._modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self._optimizers().items()},
            "schedulers": {k: s.state_dict() for k, s in self._schedulers().items()},
            "rng": self._rng_state, "history": self.history,
            "cycles": ({"source": _cycles[0].state_dict(), "target": _cycles[1].state_dict()}
                       if _cycles is not None else self._pending_cycles),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        if self.log_path:
            self.write_log(self.log_path)

    def load_checkpoint(self, path) -> "DAMethod":
        """Restore a checkpoint written by the same method on the same task with the same
        hyper-parameters and seed; the next fit continues from it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{type(self).__name__}.load_checkpoint: no file {str(path)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, pickle error, ...: all mean "not a checkpoint we can read"
            raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a lowrank.da checkpoint (format {CHECKPOINT_FORMAT!r})")
        if state["method"] != self.name:
            raise ValueError(f"{path}: checkpoint of method {state['method']!r} cannot be loaded into "
                             f"{type(self).__name__} (method {self.name!r})")
        for key in ("task", "seed", "hparams"):
            if state[key] != self.config()[key]:
                raise ValueError(f"{path}: checkpoint {key} {state[key]!r} differs from this {type(self).__name__}'s "
                                 f"{self.config()[key]!r}")
        for key, module in self._modules().items():
            module.load_state_dict(state["modules"][key])
        for key, optimizer in self._optimizers().items():
            optimizer.load_state_dict(state["optimizers"][key])
        for key, scheduler in self._schedulers().items():
            scheduler.load_state_dict(state["schedulers"][key])
        self.step, self._rng_state, self.history = state["step"], state["rng"], list(state["history"])
        self._pending_cycles = state["cycles"]
        return self


# ------------------------------------------------------------------ shared pieces


def _source_optimizer(modules, hp: dict) -> torch.optim.Optimizer:
    params = [p for m in modules for p in m.parameters()]
    return torch.optim.Adam(params, lr=hp["source_lr"], betas=(0.9, 0.999), weight_decay=hp["weight_decay"])


def _discriminator(method: DAMethod, discriminator: Optional[nn.Module]) -> nn.Module:
    """The given discriminator, checked against the encoder, or the task network's own."""
    if discriminator is None:
        return build_network(method.task.network, "discriminator", in_features=method.encoder.out_features)
    check_feature_sizes(type(method).__name__, method.encoder, discriminator=discriminator)
    return discriminator


_SOURCE_DEFAULTS = {"source_steps": 1500, "source_lr": 1e-3, "weight_decay": 5e-4, "batch_size": 64}


class SourceOnly(DAMethod):
    """Train the encoder and classifier on the source domain only: the baseline."""

    name = "source_only"
    defaults = dict(_SOURCE_DEFAULTS)

    def _build(self, discriminator):
        self.optimizer = _source_optimizer([self.encoder, self.classifier], self.hparams)

    @property
    def phases(self):
        return [("source", self.hparams["source_steps"])]

    def _optimizers(self):
        return {"source": self.optimizer}

    def _train_step(self, phase, source, target):
        x, y = source.next()[:2]
        loss = F.cross_entropy(self.classifier(self.encoder(x)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"class_loss": loss.item()}


class DANN(DAMethod):
    """Domain-adversarial training (Ganin & Lempitsky 2015): a domain classifier behind a
    gradient-reversal layer on the encoder's features, trained jointly with the label
    classifier. λ_p = 2/(1+exp(−10p)) − 1; SGD (momentum 0.9) with μ_p = μ0/(1+10p)^0.75.
    The loss is the paper's (Ganin et al. 2016, the objective E): the source mean of the class loss
    plus the source mean and the target mean of the domain loss; the logged `domain_loss` is the
    average of those two means (ln 2 when the domain classifier cannot tell the domains apart)."""

    name = "dann"
    defaults = {"steps": 2000, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64,
                "grl_backend": None}

    def _build(self, discriminator):
        self.discriminator = _discriminator(self, discriminator)
        self.grl = GradientReversal(0.0, backend=self.hparams["grl_backend"])
        params = [p for m in (self.encoder, self.classifier, self.discriminator) for p in m.parameters()]
        self.optimizer = torch.optim.SGD(params, lr=self.hparams["lr"], momentum=self.hparams["momentum"],
                                         weight_decay=self.hparams["weight_decay"])
        self.lambda_schedule = DANNLambdaScheduler(self.grl, total_steps=self.hparams["steps"])

    def _modules(self):
        return {"encoder": self.encoder, "classifier": self.classifier, "discriminator": self.discriminator}

    def _optimizers(self):
        return {"sgd": self.optimizer}

    def _schedulers(self):
        return {"lambda": self.lambda_schedule}

    def _train_step(self, phase, source, target):
        p = self.lambda_schedule.progress
        lr = self.hparams["lr"] / (1 + 10 * p) ** 0.75
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        (xs, ys), xt = source.next()[:2], _images(target.next())
        features = self.encoder(torch.cat([xs, xt]))
        class_loss = F.cross_entropy(self.classifier(features[: xs.shape[0]]), ys)
        domain_logits = self.discriminator(self.grl(features))
        source_domain_loss = F.cross_entropy(domain_logits[: xs.shape[0]], torch.zeros(xs.shape[0], dtype=torch.long))
        target_domain_loss = F.cross_entropy(domain_logits[xs.shape[0]:], torch.ones(xt.shape[0], dtype=torch.long))
        self.optimizer.zero_grad(set_to_none=True)
        # The paper's regulariser: the source mean plus the target mean of the domain loss (not their pooled mean).
        (class_loss + source_domain_loss + target_domain_loss).backward()
        self.optimizer.step()
        lambda_ = self.grl.lambda_
        self.lambda_schedule.step()
        domain_loss = (source_domain_loss.item() + target_domain_loss.item()) / 2  # chance level: ln 2
        return {"class_loss": class_loss.item(), "domain_loss": domain_loss, "lambda": lambda_, "lr": lr}


class ADDA(DAMethod):
    """Adversarial discriminative domain adaptation (Tzeng et al. 2017).

    1. pre-train the source encoder and classifier on the source (`source_steps`);
    2. initialise the target encoder from the source encoder;
    3. train the target encoder against the task network's discriminator (the paper's FC 500-500-2
       on the LeNet tasks) with the inverted-label GAN loss, both with Adam lr 2e-4, β1 0.5
       (`adapt_steps`); source encoder and classifier fixed;
    4. predict with the target encoder and the source classifier.
    """

    name = "adda"
    defaults = {**_SOURCE_DEFAULTS, "adapt_steps": 2000, "adapt_lr": 2e-4, "adapt_beta1": 0.5}

    def _build(self, discriminator):
        self.discriminator = _discriminator(self, discriminator)
        self.target_encoder = copy.deepcopy(self.encoder)  # overwritten from the source encoder after phase 1
        hp = self.hparams
        self.source_optimizer = _source_optimizer([self.encoder, self.classifier], hp)
        betas = (hp["adapt_beta1"], 0.999)
        self.target_optimizer = torch.optim.Adam(self.target_encoder.parameters(), lr=hp["adapt_lr"], betas=betas)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=hp["adapt_lr"], betas=betas)

    @property
    def phases(self):
        return [("source", self.hparams["source_steps"]), ("adapt", self.hparams["adapt_steps"])]

    def _modules(self):
        return {"encoder": self.encoder, "classifier": self.classifier, "target_encoder": self.target_encoder,
                "discriminator": self.discriminator}

    def _optimizers(self):
        return {"source": self.source_optimizer, "target": self.target_optimizer,
                "discriminator": self.discriminator_optimizer}

    def _set_train_mode(self, training: bool) -> None:
        super()._set_train_mode(training)
        if training and self.step >= self.hparams["source_steps"]:
            self.encoder.eval()  # fixed in the adaptation phase: its features are the "real" ones
            self.classifier.eval()

    def _train_step(self, phase, source, target):
        if phase == "source":
            x, y = source.next()[:2]
            loss = F.cross_entropy(self.classifier(self.encoder(x)), y)
            self.source_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.source_optimizer.step()
            if self.step + 1 == self.hparams["source_steps"]:
                self.target_encoder.load_state_dict(self.encoder.state_dict())
            return {"class_loss": loss.item()}
        xs, xt = source.next()[0], _images(target.next())
        with torch.no_grad():
            source_features = self.encoder(xs)
        target_features = self.target_encoder(xt)
        # Discriminator: source features are labelled 1, target features 0.
        logits = self.discriminator(torch.cat([source_features, target_features.detach()]))
        domains = torch.cat([torch.ones(xs.shape[0], dtype=torch.long), torch.zeros(xt.shape[0], dtype=torch.long)])
        discriminator_loss = F.cross_entropy(logits, domains)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        discriminator_loss.backward()
        self.discriminator_optimizer.step()
        # Target encoder: the inverted labels (target features called source).
        target_loss = F.cross_entropy(self.discriminator(target_features),
                                      torch.ones(xt.shape[0], dtype=torch.long))
        self.target_optimizer.zero_grad(set_to_none=True)
        target_loss.backward()
        self.target_optimizer.step()
        accuracy = (logits.argmax(1) == domains).float().mean().item()
        return {"discriminator_loss": discriminator_loss.item(), "target_loss": target_loss.item(),
                "discriminator_accuracy": accuracy}

    def _predict(self, x):
        return self.classifier(self.target_encoder(x))


class DomainConfusion(DAMethod):
    """Domain confusion (Tzeng et al. 2015): alternate a domain classifier trained to tell the
    domains apart with an encoder trained on the source labels plus `confusion_weight` times the
    confusion loss, the cross-entropy between the domain classifier's prediction and the uniform
    distribution over domains (all features, both domains)."""

    name = "domain_confusion"
    defaults = {**_SOURCE_DEFAULTS, "steps": 2000, "confusion_weight": 0.1, "adapt_lr": 2e-4, "adapt_beta1": 0.5}

    def _build(self, discriminator):
        self.discriminator = _discriminator(self, discriminator)
        hp = self.hparams
        self.optimizer = _source_optimizer([self.encoder, self.classifier], hp)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=hp["adapt_lr"],
                                                        betas=(hp["adapt_beta1"], 0.999))

    def _modules(self):
        return {"encoder": self.encoder, "classifier": self.classifier, "discriminator": self.discriminator}

    def _optimizers(self):
        return {"model": self.optimizer, "discriminator": self.discriminator_optimizer}

    def _train_step(self, phase, source, target):
        (xs, ys), xt = source.next()[:2], _images(target.next())
        features = self.encoder(torch.cat([xs, xt]))
        domains = torch.cat([torch.zeros(xs.shape[0], dtype=torch.long), torch.ones(xt.shape[0], dtype=torch.long)])
        discriminator_loss = F.cross_entropy(self.discriminator(features.detach()), domains)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        discriminator_loss.backward()
        self.discriminator_optimizer.step()

        class_loss = F.cross_entropy(self.classifier(features[: xs.shape[0]]), ys)
        confusion_loss = -F.log_softmax(self.discriminator(features), dim=1).mean()  # CE to uniform, / 2 terms
        self.optimizer.zero_grad(set_to_none=True)
        (class_loss + self.hparams["confusion_weight"] * confusion_loss).backward()
        self.optimizer.step()  # the discriminator's grads from this loss are cleared before its next step
        return {"class_loss": class_loss.item(), "confusion_loss": confusion_loss.item(),
                "discriminator_loss": discriminator_loss.item()}


class _CoupledGenerators(nn.Module):
    """Noise [N, noise_dim] -> (source image, target image): the layers that turn noise into
    shapes are shared, the last (rendering) layer is per domain (CoGAN's weight sharing)."""

    def __init__(self, channels: int, image_size: int, noise_dim: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"CoGAN: image_size must be a multiple of 4, got {image_size}")
        side = image_size // 4
        self.shared = nn.Sequential(
            nn.Linear(noise_dim, 128 * side * side), nn.BatchNorm1d(128 * side * side), nn.ReLU(),
            nn.Unflatten(1, (128, side, side)),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(64, channels, 4, stride=2, padding=1), nn.Tanh()) for _ in range(2))

    def forward(self, z):
        hidden = self.shared(z)
        return self.heads[0](hidden), self.heads[1](hidden)


class _TargetStream(nn.Module):
    """The target discriminator's feature stream: its own first convolution, then every later
    layer of the source encoder (shared, not copied)."""

    def __init__(self, encoder: LeNetEncoder):
        super().__init__()
        self.first = copy.deepcopy(encoder.features[0])
        self.encoder = [encoder]  # a list: the shared encoder is owned (and saved) by the method, not here

    def forward(self, x):
        encoder = self.encoder[0]
        return encoder.fc(encoder.features[1:](self.first(x)))


class CoGAN(DAMethod):
    """Coupled GANs for adaptation (Liu & Tuzel 2016): two generators sharing all but their last
    layer draw source and target images from one noise vector; two discriminators share all but
    their first convolution (the LeNet encoder is the source discriminator's trunk). A classifier
    on the source discriminator's features learns the source labels; the target is classified
    through its own first convolution and the shared layers."""

    name = "cogan"
    defaults = {"steps": 3200, "batch_size": 32, "lr": 2e-4, "beta1": 0.5, "noise_dim": 100, "class_weight": 1.0}

    def _build(self, discriminator):
        if not isinstance(self.encoder, LeNetEncoder):
            raise ValueError(f"CoGAN: the encoder must be a LeNetEncoder (the two discriminators share all of it "
                             f"but its first convolution), got {type(self.encoder).__name__}")
        if discriminator is not None:
            raise ValueError("CoGAN: takes no discriminator; its discriminators are the encoder streams")
        hp = self.hparams
        self.target_stream = _TargetStream(self.encoder)
        self.critic = nn.Sequential(nn.ReLU(), nn.Linear(self.encoder.out_features, 1))  # real/fake, shared
        self.generators = _CoupledGenerators(self.task.channels, self.task.image_size, hp["noise_dim"])
        betas = (hp["beta1"], 0.999)
        discriminator_params = [p for m in (self.encoder, self.target_stream, self.critic, self.classifier)
                                for p in m.parameters()]
        self.discriminator_optimizer = torch.optim.Adam(discriminator_params, lr=hp["lr"], betas=betas)
        self.generator_optimizer = torch.optim.Adam(self.generators.parameters(), lr=hp["lr"], betas=betas)

    def _modules(self):
        return {"encoder": self.encoder, "classifier": self.classifier, "target_stream": self.target_stream,
                "critic": self.critic, "generators": self.generators}

    def _optimizers(self):
        return {"discriminator": self.discriminator_optimizer, "generator": self.generator_optimizer}

    def _train_step(self, phase, source, target):
        (xs, ys), xt = source.next()[:2], _images(target.next())
        z = torch.randn(max(xs.shape[0], xt.shape[0]), self.hparams["noise_dim"])
        fake_s, fake_t = self.generators(z)
        real = lambda logits: F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # noqa: E731
        fake = lambda logits: F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))  # noqa: E731

        source_features = self.encoder(xs)
        class_loss = F.cross_entropy(self.classifier(source_features), ys)
        discriminator_loss = (real(self.critic(source_features)) + fake(self.critic(self.encoder(fake_s.detach())))
                              + real(self.critic(self.target_stream(xt)))
                              + fake(self.critic(self.target_stream(fake_t.detach()))))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        (discriminator_loss + self.hparams["class_weight"] * class_loss).backward()
        self.discriminator_optimizer.step()

        generator_loss = real(self.critic(self.encoder(fake_s))) + real(self.critic(self.target_stream(fake_t)))
        self.generator_optimizer.zero_grad(set_to_none=True)
        generator_loss.backward()  # the discriminator's grads from this are cleared before its next step
        self.generator_optimizer.step()
        return {"class_loss": class_loss.item(), "discriminator_loss": discriminator_loss.item(),
                "generator_loss": generator_loss.item()}

    def _predict(self, x):
        return self.classifier(self.target_stream(x))


METHODS = {cls.name: cls for cls in (SourceOnly, DANN, DomainConfusion, CoGAN, ADDA)}


def make_method(name: str, task="mnist-usps", **kwargs) -> DAMethod:
    """A method by name: one of METHODS."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name](task, **kwargs)
