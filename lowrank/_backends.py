"""Which compute backends are usable here, and why the others are not.

Backends:
  torch   pure PyTorch; always available; the reference every other path is tested against
  cpu     the C++ extension (lowrank._C) on CPU tensors
  cuda    the C++/CUDA extension on CUDA tensors
  triton  the Triton kernels in lowrank.kernels, on CUDA tensors, or on CPU tensors
          when TRITON_INTERPRET=1 (how CI and machines without a GPU run them)
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch

NAMES = ("torch", "cpu", "triton", "cuda")


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _load_extension():
    """Import lowrank._C once; return (module or None, reason it is unusable)."""
    try:
        _C = importlib.import_module("lowrank._C")
    except ImportError as exc:
        return (
            None,
            f"C++ extension lowrank._C is not importable ({exc}); build it with 'pip install --no-build-isolation .'",
        )
    built_for = _C.build_info()["torch_version"]
    if built_for != torch.__version__:
        return (
            None,
            f"C++ extension was built for torch {built_for}, but torch {torch.__version__} is running; rebuild it",
        )
    return _C, ""


EXTENSION, _EXTENSION_PROBLEM = _load_extension()


def has_native_op(name: str) -> bool:
    """Whether the extension defines lowrank::<name>. An extension built from older sources lacks the
    newer ops: it is then set aside for every op (its other ops may be out of date too), and the cpu
    and cuda backends report why, instead of `import lowrank` failing."""
    global EXTENSION, _EXTENSION_PROBLEM
    if EXTENSION is not None and not hasattr(torch.ops.lowrank, name):
        EXTENSION, _EXTENSION_PROBLEM = None, (
            f"C++ extension lowrank._C was built from older sources (it lacks lowrank::{name}); rebuild it with "
            "'pip install --no-build-isolation .'"
        )
    return EXTENSION is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """The SM count of a CUDA device, which the Triton launchers size their grids by."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True, "pure PyTorch reference")
    if name == "cpu":
        if EXTENSION is None:
            return BackendStatus(False, _EXTENSION_PROBLEM)
        return BackendStatus(True, "C++ extension, CPU kernels")
    if name == "cuda":
        if EXTENSION is None:
            return BackendStatus(False, _EXTENSION_PROBLEM)
        if not EXTENSION.build_info()["with_cuda"]:
            return BackendStatus(
                False, "C++ extension was built without CUDA (torch without CUDA, no nvcc, or LOWRANK_CUDA=0)"
            )
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible to torch")
        return BackendStatus(True, f"C++/CUDA extension (CUDA {EXTENSION.build_info()['cuda_version']})")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed")
        if triton_interpret():
            return BackendStatus(True, "Triton kernels in the interpreter (TRITON_INTERPRET=1), CPU tensors")
        if not torch.cuda.is_available():
            return BackendStatus(
                False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU)"
            )
        return BackendStatus(True, "Triton kernels on the GPU")
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and, if not, why (one line)."""
    return {name: _status(name) for name in NAMES}


def _check_device(name: str, device: torch.device) -> None:
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
        )


def check_name(owner: str, backend) -> None:
    """Refuse a backend argument that is not None, "auto" or a backend's name, naming `owner`."""
    if backend is not None and backend not in (*NAMES, "auto"):
        raise ValueError(f"{owner}: backend must be None, 'auto' or one of {NAMES}, got {backend!r}")


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """Check a requested backend (None = LOWRANK_BACKEND, else 'auto') can run `op` on `device`."""
    if backend is None:
        backend = os.environ.get("LOWRANK_BACKEND", "auto")
        check_name(f"{op}: the environment variable LOWRANK_BACKEND", backend)
    check_name(op, backend)
    if backend == "auto":
        return "auto"  # chosen per problem shape inside the op, by measurement (lowrank.autotune)
    status = _status(backend)
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
    _check_device(backend, device)
    return backend
