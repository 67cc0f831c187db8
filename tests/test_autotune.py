"""backend="auto": measured once per problem-shape key, cached, the same choice for backward."""

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
    """Replace the stopwatch; record which backends were measured."""
    measured = []
    real_pick = autotune.pick

    def pick(key, device, measure):
        def fake_measure(name):
            measured.append(name)
            return seconds_by_backend[name]

        return real_pick(key, device, fake_measure)

    monkeypatch.setattr(autotune, "candidates", lambda device: tuple(seconds_by_backend))
    monkeypatch.setattr(autotune, "pick", pick)
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
    assert sorted(measured) == ["cpu", "torch"]  # measured once, not per call nor per backward
    assert list(autotune.choices().values()) == [fastest]
    lora_linear(*inputs(129), 0.5, backend="auto")  # next bucket: measured again
    assert len(measured) == 4 and len(autotune.choices()) == 2


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
    assert measured == [] and autotune.choices() == {}


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
