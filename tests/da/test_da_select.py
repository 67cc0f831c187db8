"""lowrank.da.select: reverse validation's plumbing and the choice it makes (not its accuracy)."""

import json

import pytest
import torch

from lowrank.da import bench, get_task, load_task_data, select as selection

pytestmark = pytest.mark.usefixtures("one_thread")


def test_backward_fit_learns_the_forward_pseudo_labels_and_is_scored_on_source_validation(monkeypatch):
    task = get_task("mnist-usps", augment=False)
    data = load_task_data(task, seed=0, n_source=40, n_target=30, n_test=20)
    made, fitted = [], []
    real_make = bench.make_method

    def recording_make(*args, **kwargs):
        method = real_make(*args, **kwargs)
        real_fit = method.fit
        method.fit = lambda source, target: (fitted.append((source.dataset, target.dataset)), real_fit(source, target))[
            1
        ]
        made.append(method)
        return method

    monkeypatch.setattr(bench, "make_method", recording_make)
    result = selection.reverse_validation("dann", task, 0, data, {"steps": 3, "batch_size": 8})
    forward, backward = made
    (forward_source, forward_target), (backward_source, backward_target) = fitted
    assert forward_source is data.source_train and forward_target is data.target_train
    expected = forward.predict(data.target_train.images).argmax(1)
    assert torch.equal(backward_source.labels, expected)  # pseudo-labels, not the (unavailable) target labels
    assert backward_source.images is data.target_train
    assert torch.equal(backward_target.images, data.source_train.images) and len(backward_target[0]) == 1
    loader = bench.make_loader(data.source_val, 1000, 0, shuffle=False, drop_last=False)
    assert result["reverse_accuracy"] == backward.evaluate(loader)
    assert result["source_val_accuracy"] == forward.evaluate(loader)
    assert sum(result["pseudo_label_counts"]) == len(data.target_train)


def test_select_takes_the_highest_reverse_score_and_the_earlier_on_ties():
    results = [{"hparams": {"lr": 1}, "reverse_accuracy": 0.5}, {"hparams": {"lr": 2}, "reverse_accuracy": 0.7},
               {"hparams": {"lr": 3}, "reverse_accuracy": 0.7}]
    assert selection.select(results)["hparams"] == {"lr": 2}
    with pytest.raises(ValueError, match="no candidates"):
        selection.select([])


def test_grid_is_the_product_of_typed_values():
    grid = selection.parse_grid("adda", ["adapt_lr=0.0002,0.001", "adapt_steps=500"])
    assert grid == [{"adapt_lr": 0.0002, "adapt_steps": 500}, {"adapt_lr": 0.001, "adapt_steps": 500}]
    assert isinstance(grid[0]["adapt_steps"], int)
    with pytest.raises(ValueError, match="dann has no hyper-parameter 'adapt_lr'"):
        selection.parse_grid("dann", ["adapt_lr=0.1"])
    with pytest.raises(ValueError, match="expected name=value"):
        selection.parse_grid("dann", ["lr"])
    with pytest.raises(ValueError, match=r"'lr=0.01,abc': lr must be a finite number, got 'abc'"):
        selection.parse_grid("dann", ["lr=0.01,abc"])


def test_cli_quick_writes_the_choice(tmp_path, capsys):
    assert selection.main(["--task", "usps-mnist", "--method", "dann", "--grid", "lr=0.01,0.003", "--quick",
                           "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reverse validation (chosen:" in out and out.count("| {'steps': 8, 'lr': ") == 2
    report = json.loads((tmp_path / "da_select_usps-mnist_dann_lr_quick.json").read_text())
    assert [c["hparams"]["lr"] for c in report["candidates"]] == [0.01, 0.003]
    assert report["chosen"] == selection.select(report["candidates"])["hparams"]
    with pytest.raises(SystemExit):
        selection.main(["--task", "usps-mnist", "--method", "source_only", "--out-dir", str(tmp_path)])
    assert "unknown adaptation method 'source_only'" in capsys.readouterr().err
