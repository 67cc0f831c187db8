"""Data loaders for the transfer-learning and domain-adaptation benchmarks (see lowrank.data.digits)."""

from lowrank.data import digits
from lowrank.data.digits import *  # noqa: F401,F403  (the names listed in digits.__all__)

__all__ = list(digits.__all__)
