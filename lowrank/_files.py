"""The package's files, read and written once, with errors that name the file: tensors (safetensors
with a content hash) and JSON.

A tensor file written here records in its safetensors metadata (a str -> str map that PEFT and other
readers ignore) HASH_KEY: the sha256 of its tensors (tensors_sha256). read_tensors recomputes it and
refuses a file whose tensors no longer match (a bit flip, a partial overwrite); a file without one
(PEFT's, or written by other code) loads unchecked, unless the caller holds the hash it must have
(the Trainer's checkpoints record theirs in trainer.json).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

HASH_KEY = "lowrank_sha256"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` as safetensors with their sha256 in the metadata; returns that hash."""
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    digest = tensors_sha256(tensors)
    save_file(tensors, path, metadata={"format": "pt", HASH_KEY: digest})
    return digest


def read_tensors(path: str | os.PathLike, what: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU), checked against the hash in its metadata and
    against `expected_sha256` when given; `what` (the caller) starts every error message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    try:
        with safe_open(path, framework="pt") as file:
            recorded = (file.metadata() or {}).get(HASH_KEY)
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{what}: {path} is not a readable safetensors file (truncated or damaged?): {err}") from None
    if recorded is None and expected_sha256 is None:
        return tensors
    actual = tensors_sha256(tensors)
    for source, expected in (("its own metadata", recorded), ("the checkpoint's trainer.json", expected_sha256)):
        if expected is not None and actual != expected:
            raise ValueError(f"{what}: {path} is corrupt: its tensors hash to sha256 {actual[:16]}..., but "
                             f"{source} records {expected[:16]}...; restore the file or write it again")
    return tensors


def _unique_keys(path: str, what: str):
    def build(pairs: list[tuple[str, object]]) -> dict:
        mapping = {}
        for key, value in pairs:
            if key in mapping:
                raise ValueError(f"{what}: {path} has the key {key!r} twice in one object; expected each key once")
            mapping[key] = value
        return mapping

    return build


def read_json(path: str | os.PathLike, what: str, expected: type = dict):
    """A JSON object (or an `expected` list) from `path`, with an error naming the file when it is
    missing, is not JSON, repeats a key or holds something else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file, object_pairs_hook=_unique_keys(path, what))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: {path} is not valid JSON (truncated or damaged?): {err}") from None
    if not isinstance(value, expected):
        shape = "an object {...}" if expected is dict else f"a {expected.__name__}"
        raise ValueError(f"{what}: {path} holds a JSON {type(value).__name__}; expected {shape}")
    return value


def require_fields(what: str, path: str, values: dict, types: dict[str, type | tuple[type, ...]]) -> None:
    """Refuse `values` (read from `path`) unless each key of `types` is present with a value of that type."""
    for key, expected in types.items():
        if key not in values:
            raise ValueError(f"{what}: {path} lacks the field {key!r} (incomplete, or written by another version)")
        allowed = expected if isinstance(expected, tuple) else (expected,)
        value = values[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # JSON true is no count
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{what}: {path} has {key}={value!r}; expected a value of type {names}")
