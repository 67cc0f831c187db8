"""lowrank.finetune.bench (the real-data strategy comparison) and the RandomAffine augmentation it uses."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lowrank.data import DigitArrays, DigitDataset
from lowrank.data.augment import RandomAffine
from lowrank.finetune import bench


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_covers_every_strategy_and_writes_its_files(tmp_path, digits_root, capsys, keep_torch_threads):
    assert bench.main(["--quick", "--no-progress", "--data-root", digits_root, "--out-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "finetune_digits_quick.json").read_text())
    assert (tmp_path / "finetune_digits_quick.md").read_text().strip().endswith(table.strip().splitlines()[-1])
    rows = {(row["architecture"], row["method"]): row for row in report["summary"]}
    expected = {(arch, name) for name, method in bench.METHODS.items() for arch in method.architectures}
    expected |= {(arch, f"multistage_{name}") for arch in bench.ARCHITECTURES for name in bench.MULTISTAGE}
    assert set(rows) == expected
    for (arch, name), row in rows.items():
        targets = {"usps"} if name.startswith("multistage") else set(bench.TARGETS)
        assert set(row["targets"]) == targets
        assert all(0.0 <= result["mean"] <= 1.0 for result in row["targets"].values())
        assert f"| {arch} | {row['label']} |" in table
    params = {key: row["trainable_parameters"] for key, row in rows.items()}
    assert params["cnn", "no_adaptation"] == 0
    assert params["cnn", "feature_extraction"] == 128 * 10 + 10  # SmallCNN's head
    for arch in bench.ARCHITECTURES:
        assert params[arch, "feature_extraction"] < params[arch, "lora_r4"] < params[arch, "lora_r8"] \
            < params[arch, "full_finetuning"]
        assert params[arch, "multistage_lora_r8"] == params[arch, "lora_r8"]  # a fresh adapter in the last stage
    pytest.importorskip("matplotlib")
    assert (tmp_path / "finetune_digits_quick.png").stat().st_size > 0


def test_every_strategy_has_a_learning_rate_for_every_target():
    for name, method in bench.METHODS.items():
        for arch in method.architectures:
            for target in bench.TARGETS:
                if method.make is not None:
                    assert bench.learning_rate(arch, name, target) in bench.LR_GRID
    with pytest.raises(ValueError, match=r"no learning rate for \(cnn, prompt_tuning, usps\)"):
        bench.learning_rate("cnn", "prompt_tuning", "usps")


def test_cross_validation_picks_the_best_rate_and_the_smaller_on_ties(monkeypatch):
    held_out_accuracy = {1e-3: 0.5, 1e-2: 0.8, 1e-1: 0.8}
    monkeypatch.setattr(bench, "LR_GRID", tuple(held_out_accuracy))
    folds = []

    def fake_transfer(pretrained, arch, method, train, test, config, lr):
        folds.append((set(train.indices), set(test.indices), test.dataset.transform))
        return {"accuracy": held_out_accuracy[lr]}

    monkeypatch.setattr(bench, "transfer", fake_transfer)
    labels = torch.arange(20) % 10
    train = DigitDataset(DigitArrays(torch.zeros(20, 4, 4, 1, dtype=torch.uint8).numpy(), labels.numpy()), size=None,
                         transform=RandomAffine())
    lr, scores = bench.cross_validated_lr(None, "cnn", "lora_r4", train, bench.TRANSFER)
    assert lr == 1e-2 and scores == held_out_accuracy
    first_fit, first_held_out, transform = folds[0]
    assert first_fit.isdisjoint(first_held_out) and first_fit | first_held_out == set(range(20))
    assert sorted(labels[list(first_held_out)].tolist()) == list(range(10))  # stratified: one of each class
    assert transform is None  # held-out images are not augmented


def test_missing_data_names_the_file(tmp_path, capsys, keep_torch_threads):
    assert bench.main(["--quick", "--no-progress", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    assert "mnist_5k.csv.gz" in capsys.readouterr().err


def test_unknown_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "lora_r4,dora"])
    assert "unknown method(s) ['dora']" in capsys.readouterr().err


def test_random_affine_identity_background_and_shift():
    image = torch.full((3, 28, 28), -1.0)
    image[:, 10:18, 12:16] = 1.0
    identity = RandomAffine(degrees=0.0, scale=(1.0, 1.0), translate=0.0)
    torch.testing.assert_close(identity(image), image)
    torch.manual_seed(0)
    moved = RandomAffine(degrees=0.0, scale=(1.0, 1.0), translate=0.2)(image)
    assert moved.shape == image.shape and moved.min() >= -1.0 - 1e-6 and moved.max() <= 1.0 + 1e-6
    assert not torch.allclose(moved, image)
    assert moved[:, 0, 0].eq(-1.0).all()  # what enters from outside is background, not zero
    def mass(images):
        return (images + 1).sum()

    torch.testing.assert_close(mass(moved), mass(image), rtol=0.02, atol=0.0)  # a shift keeps the digit inside


def test_random_affine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="RandomAffine: need degrees >= 0"):
        RandomAffine(scale=(1.2, 1.0))
    with pytest.raises(ValueError, match=r"expected one image \[C, H, W\]"):
        RandomAffine()(torch.zeros(1, 1, 28, 28))


def test_random_affine_samples_where_affine_grid_does():
    image = torch.randn(3, 28, 28)
    torch.manual_seed(3)
    augmented = RandomAffine(degrees=15.0, scale=(0.8, 1.2), translate=0.1)(image)
    torch.manual_seed(3)
    u = torch.rand(4)
    angle, zoom = math.radians((2 * u[0].item() - 1) * 15.0), 0.8 + 0.4 * u[1].item()
    shift = ((2 * u[2:] - 1) * 0.2).tolist()
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[[cos, -sin, shift[0]], [sin, cos, shift[1]]]])
    grid = F.affine_grid(theta, [1, 3, 28, 28], align_corners=False)
    expected = F.grid_sample((image + 1).unsqueeze(0), grid, align_corners=False).squeeze(0) - 1
    torch.testing.assert_close(augmented, expected, atol=1e-4, rtol=0)
