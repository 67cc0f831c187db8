"""Gradient reversal for domain-adversarial training (DANN, Ganin & Lempitsky 2015).

    features ──► GradientReversal ──► domain classifier

The layer passes features through unchanged and multiplies the gradient flowing back by −λ,
so the feature extractor learns to confuse the domain classifier:
L_total(θ_f) = L_y(θ_f, θ_y) − λ·L_d(θ_f, θ_d). DANN ramps λ from 0 to 1 over training with
λ_p = 2/(1+exp(−γ·p)) − 1, p = step/total_steps, γ = 10: DANNLambdaScheduler sets it each step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Optional, Union

import torch
from torch import nn

from lowrank import _backends
from lowrank.ops.grad_reverse import grad_reverse

__all__ = ["GradientReversal", "DANNLambdaScheduler", "dann_lambda"]


def _finite_number(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


class GradientReversal(nn.Module):
    """Identity in the forward pass (a view of the input, no copy); −λ·grad in the backward.

    λ lives in a 0-dim float64 buffer, so setting `lambda_` between steps changes no Python
    constant that torch.compile guards on: no recompiles. The buffer is not saved in the
    state_dict (a schedule recomputes it) and stays float64 under .half()/.to(dtype).
    Don't set λ between a forward and its backward: autograd saved it for that backward.
    """

    def __init__(self, lambda_: float = 1.0, *, backend: Optional[str] = None):
        super().__init__()
        _backends.check_name(type(self).__name__, backend)
        self.backend = backend
        value = _finite_number(type(self).__name__, "lambda_", lambda_)
        self.register_buffer("_lambda", torch.tensor(value, dtype=torch.float64), persistent=False)

    @property
    def lambda_(self) -> float:
        return self._lambda.item()

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        value = _finite_number(type(self).__name__, "lambda_", value)
        with torch.no_grad():
            self._lambda.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self._lambda, backend=self.backend)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would round λ; only its device follows the module.
        lambda_ = self._lambda
        super()._apply(fn, recurse)
        self._lambda = lambda_.to(self._lambda.device)
        return self

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_:g}" + (f", backend={self.backend!r}" if self.backend is not None else "")


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """DANN's λ at training progress p ∈ [0, 1]: 2/(1+exp(−γ·p)) − 1, rising from 0 at p=0 to
    nearly 1 at p=1 (0.99991 for γ=10)."""
    p = _finite_number("dann_lambda", "p", p)
    gamma = _finite_number("dann_lambda", "gamma", gamma)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dann_lambda: p (training progress, step/total_steps) must be in [0, 1], got {p}")
    if gamma <= 0.0:
        raise ValueError(f"dann_lambda: gamma must be positive, got {gamma}")
    return math.tanh(gamma * p / 2)  # = 2/(1+exp(−γp)) − 1, without cancellation near p = 0


class DANNLambdaScheduler:
    """Sets λ of every GradientReversal in `modules` to dann_lambda(step/total_steps, gamma).

    modules: a module (its GradientReversal submodules, itself included, are updated) or an
    iterable of modules. Construction sets λ for step 0 (λ=0); call step() once per training
    step. Past total_steps, p stays at 1.

        scheduler = DANNLambdaScheduler(model, total_steps=len(loader) * epochs)
        for batch in ...:
            loss.backward(); optimizer.step(); scheduler.step()
    """

    def __init__(self, modules: Union[nn.Module, Iterable[nn.Module]], total_steps: int, gamma: float = 10.0):
        owner = type(self).__name__
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"{owner}: total_steps must be a positive integer, got {total_steps!r}")
        gamma = _finite_number(owner, "gamma", gamma)
        if gamma <= 0.0:
            raise ValueError(f"{owner}: gamma must be positive, got {gamma}")
        if isinstance(modules, nn.Module):
            modules = [modules]
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, GradientReversal)]
        if not self.layers:
            raise ValueError(f"{owner}: no GradientReversal module found in the modules given")
        self.total_steps = total_steps
        self.gamma = gamma
        self.step_count = 0
        self._apply_lambda()

    @property
    def progress(self) -> float:
        return min(self.step_count / self.total_steps, 1.0)

    def get_lambda(self) -> float:
        return dann_lambda(self.progress, self.gamma)

    def step(self) -> float:
        """Advance one training step; returns the new λ."""
        self.step_count += 1
        return self._apply_lambda()

    def _apply_lambda(self) -> float:
        value = self.get_lambda()
        for layer in self.layers:
            layer.lambda_ = value
        return value

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.total_steps, self.gamma = state["step_count"], state["total_steps"], state["gamma"]
        self._apply_lambda()
