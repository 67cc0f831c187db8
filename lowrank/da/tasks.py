"""The digit adaptation tasks and their data protocol (the ADDA paper's Table 2, see BRIEF).

    mnist-usps    source 2000 MNIST (of mnist_5k), target 1800 USPS train (unlabelled),
                  evaluated on USPS test (2007); 28x28 grey, USPS upscaled from 16x16
    usps-mnist    source 1800 USPS train, target 2000 MNIST (unlabelled), evaluated on MNIST test
    mnist-mnistm  source 4500 MNIST (of mnist_5k), target: a pool of the MNIST-M test file
                  (unlabelled), evaluated on a disjoint 3000 of it (fixed split); 32x32 colour
    svhn-mnist    source SVHN train, target 2000 MNIST, evaluated on MNIST test; 32x32 grey

Source and target samples are drawn per seed. A source validation set (500 images outside the
training sample) is the only labelled data besides the source training set that methods or
hyper-parameter choices may look at; the target pool is handed out without labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from lowrank.data import DigitArrays, DigitDataset, load_digits, sample_subset, split_indices, target_pool_eval_split

__all__ = ["Task", "TASKS", "get_task", "TaskData", "load_task_data", "make_loader"]

SOURCE_VAL_SIZE = 500
MNISTM_EVAL_SIZE = 3000
TARGET_SEED_OFFSET = 10_000  # target draws use seed + offset: independent of the source draw


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # (domain, split) as lowrank.data.load_digits takes them
    source_split: str
    target: str
    target_split: str
    image_size: int
    channels: int
    n_source: Optional[int]  # training images sampled per seed (None: all but the validation set)
    n_target: Optional[int]  # unlabelled target images sampled per seed (None: the whole pool)


TASKS = {
    "mnist-usps": Task("mnist-usps", "mnist", "train5k", "usps", "train", 28, 1, 2000, 1800),
    "usps-mnist": Task("usps-mnist", "usps", "train", "mnist", "train5k", 28, 1, 1800, 2000),
    "mnist-mnistm": Task("mnist-mnistm", "mnist", "train5k", "mnist_m", "test", 32, 3, None, None),
    "svhn-mnist": Task("svhn-mnist", "svhn", "train", "mnist", "train5k", 32, 1, None, 2000),
}


def get_task(task) -> Task:
    """A Task, or its name: one of TASKS."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return TASKS[task]


@dataclass
class TaskData:
    source_train: Dataset  # (image, label)
    source_val: Dataset  # (image, label)
    target_train: Dataset  # (image,) only: no target labels reach training
    target_test: Dataset  # (image, label), for evaluation only


@functools.lru_cache(maxsize=8)
def _load(domain: str, split: str, root: Optional[str]) -> DigitArrays:
    return load_digits(domain, split, root)


def load_task_data(task, seed: int, root: Optional[str] = None, n_source: Optional[int] = None,
                   n_target: Optional[int] = None, n_test: Optional[int] = None) -> TaskData:
    """The seed's samples of `task`. n_source / n_target / n_test override the protocol sizes
    (smaller runs for tests); a missing or corrupt data file raises from lowrank.data, naming it."""
    task = get_task(task)
    root = None if root is None else str(root)
    source = _load(task.source, task.source_split, root)
    target = _load(task.target, task.target_split, root)
    prepare = functools.partial(DigitDataset, size=task.image_size, channels=task.channels)

    # Source: a validation set of SOURCE_VAL_SIZE, then the training sample from the rest.
    rest, val = split_indices(len(source), min(SOURCE_VAL_SIZE, len(source) // 5), seed, source.labels)
    wanted = n_source if n_source is not None else (task.n_source or len(rest))
    train = rest[sample_subset(len(rest), min(wanted, len(rest)), seed)]

    if task.target == "mnist_m":
        pool, test = target_pool_eval_split(len(target), MNISTM_EVAL_SIZE, seed=0)
        target_test = target.subset(test)
    else:
        pool = np.arange(len(target))
        target_test = _load(task.target, "test", root)
    wanted = n_target if n_target is not None else (task.n_target or len(pool))
    pool = pool[sample_subset(len(pool), min(wanted, len(pool)), seed + TARGET_SEED_OFFSET)]
    if n_test is not None:
        target_test = target_test.subset(sample_subset(len(target_test), min(n_test, len(target_test)), 0))

    target_images = prepare(target.subset(pool)).images
    return TaskData(
        source_train=prepare(source.subset(train)),
        source_val=prepare(source.subset(val)),
        target_train=TensorDataset(target_images),
        target_test=prepare(target_test),
    )


def make_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
    """A DataLoader whose order depends only on `seed` (its own generator)."""
    batch_size = min(batch_size, len(dataset)) if drop_last else batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       generator=torch.Generator().manual_seed(seed))
