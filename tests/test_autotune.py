"""backend="auto": measured once per problem-shape key (interleaved, with a margin for the preferred
backend), cached, the same choice for backward, and pinned from a file or a checkpoint."""

import json
import sys

import pytest
import torch

from lowrank import autotune
from lowrank.ops import lora_linear, lora_linear_reference


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("LOWRANK_AUTOTUNE", raising=False)
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    autotune.clear()
    yield
    autotune.clear()


def inputs(M, K=12, N=10, r=3):
    gen = torch.Generator().manual_seed(M)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    return rand(M, K), rand(N, K).detach(), None, rand(r, K), rand(N, r)


def fake_timings(monkeypatch, seconds_by_backend):
    """Replace the stopwatch; record which backends were measured. The candidates are the keys, the
    first one preferred."""
    measured = []

    def time_interleaved(steps, device):
        measured.extend(steps)
        return {name: seconds_by_backend[name] for name in steps}

    monkeypatch.setattr(autotune, "candidates", lambda device: tuple(seconds_by_backend))
    monkeypatch.setattr(autotune, "time_interleaved", time_interleaved)
    return measured


@pytest.mark.parametrize("fastest", ["torch", "cpu"])
def test_picks_the_fastest_once_per_shape_bucket(monkeypatch, fastest):
    timings = {"cpu": 2.0, "torch": 1.0} if fastest == "torch" else {"cpu": 1.0, "torch": 2.0}
    if fastest == "cpu":
        pytest.importorskip("lowrank._C")
    measured = fake_timings(monkeypatch, timings)
    for M in (100, 120, 128):  # one power-of-two bucket
        x, W, b, A, B = inputs(M)
        y = lora_linear(x, W, b, A, B, 0.5, backend="auto")
        y.sum().backward()
    # measured once (twice to confirm leaving the preferred cpu), not per call nor per backward
    assert sorted(measured) == sorted(["cpu", "torch"] * (2 if fastest == "torch" else 1))
    assert list(autotune.choices().values()) == [fastest]
    before = len(measured)
    lora_linear(*inputs(129), 0.5, backend="auto")  # next bucket: measured again
    assert len(measured) == 2 * before and len(autotune.choices()) == 2


def test_backward_uses_the_forward_choice(monkeypatch):
    pytest.importorskip("lowrank._C")
    fake_timings(monkeypatch, {"cpu": 1.0, "torch": 2.0})
    x, W, b, A, B = inputs(16)
    lora_linear(x, W, b, A, B, 0.5, backend="auto")  # measures
    op_module = sys.modules["lowrank.ops.lora_linear"]
    original, used = op_module._BACKENDS.implementation, []
    monkeypatch.setattr(op_module._BACKENDS, "implementation", lambda name: used.append(name) or original(name))
    lora_linear(x, W, b, A, B, 0.5, backend="auto").sum().backward()
    assert used == ["cpu", "cpu"]  # forward, then backward


def test_disabled_takes_first_candidate_without_measuring(monkeypatch):
    monkeypatch.setenv("LOWRANK_AUTOTUNE", "0")
    measured = fake_timings(monkeypatch, {"torch": 5.0, "cpu": 1.0})
    lora_linear(*inputs(8), 0.5, backend="auto")
    assert measured == [] and list(autotune.choices().values()) == ["torch"]  # recorded, so checkpoints keep it


@pytest.mark.parametrize("other_seconds, expected", [(0.98, "cpu"), (0.96, "torch")])
def test_leaves_the_preferred_backend_only_beyond_the_margin(monkeypatch, other_seconds, expected):
    """Backends within MARGIN of the preferred one are noise apart: the pick must not follow that noise."""
    pytest.importorskip("lowrank._C")
    assert autotune.MARGIN == 0.03
    fake_timings(monkeypatch, {"cpu": 1.0, "torch": other_seconds})
    lora_linear(*inputs(8), 0.5, backend="auto")
    assert list(autotune.choices().values()) == [expected]


def test_leaving_the_preferred_backend_takes_two_wins(monkeypatch):
    pytest.importorskip("lowrank._C")
    rounds = iter([{"cpu": 1.0, "torch": 0.5}, {"cpu": 1.0, "torch": 1.2}])  # a win, then noise the other way
    monkeypatch.setattr(autotune, "candidates", lambda device: ("cpu", "torch"))
    monkeypatch.setattr(autotune, "time_interleaved", lambda steps, device: next(rounds))
    lora_linear(*inputs(8), 0.5, backend="auto")
    assert list(autotune.choices().values()) == ["cpu"]


def test_timing_interleaves_the_candidates_over_enough_rounds():
    calls = []
    seconds = autotune.time_interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"},
                                        torch.device("cpu"))
    rounds = autotune.WARMUP + autotune.REPEATS
    assert autotune.REPEATS >= 10 and set(seconds) == set("abc") and len(calls) == 3 * rounds
    assert [calls[3 * i:3 * i + 3] for i in range(3)] == [list("abc"), list("bca"), list("cab")]


def test_save_and_load_pin_the_picks(monkeypatch, tmp_path):
    fake_timings(monkeypatch, {"cpu": 2.0, "torch": 1.0})
    lora_linear(*inputs(8), 0.5, backend="auto")
    picked = autotune.choices()
    autotune.save(tmp_path / "picks.json")
    autotune.clear()
    measured = fake_timings(monkeypatch, {"cpu": 1.0, "torch": 2.0})  # a run that would now pick cpu
    autotune.load(tmp_path / "picks.json")
    lora_linear(*inputs(8), 0.5, backend="auto")
    assert measured == [] and autotune.choices() == picked


def test_load_refuses_a_pick_that_cannot_run_here(tmp_path):
    path = tmp_path / "picks.json"
    path.write_text(json.dumps({"format": "lowrank-autotune", "version": 1,
                                "choices": [["lora_linear", "cpu", "torch.float32", 8, 12, 10, 3, False, "cuda"]]}))
    with pytest.raises(ValueError, match=rf"{path}: autotune pick 'cuda' for .* cannot run here"):
        autotune.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} holds a JSON list; expected an object"):
        autotune.load(path)
    assert autotune.choices() == {}


def test_real_measurement_gives_reference_results():
    x, W, b, A, B = inputs(33)
    torch.manual_seed(0)
    y = lora_linear(x, W, b, A, B, 0.5, 0.2)  # default backend: auto
    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, ())
    torch.testing.assert_close(y, lora_linear_reference(x, W, b, A, B, 0.5, 0.2, seed))
    assert len(autotune.choices()) == 1
    assert set(autotune.choices().values()) <= set(autotune.candidates(x.device))


def test_measuring_leaves_the_callers_random_stream_alone():
    pytest.importorskip("lowrank._C")  # two CPU candidates, so the first call measures
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lora_linear(*inputs(40), 0.5, backend="auto")
    assert autotune.choices(), "the call should have measured"
    assert torch.equal(torch.rand(3), expected)
