import importlib
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The
# variable must be set before triton is imported, so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def poison_cuda_allocator():
    """Fill the CUDA caching allocator's free blocks (large and small pools) with 0xFF bytes,
    NaN in fp32, fp16 and bf16, so an output element a kernel forgets to write shows up."""
    torch.cuda.synchronize()
    large = torch.empty(512 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(64)]
    del large, small


@pytest.fixture
def poison_cuda():
    """For tests that poison again between steps (e.g. between forward and backward)."""
    return poison_cuda_allocator


@pytest.fixture(autouse=True)
def _poisoned_cuda_memory():
    """Every test on a GPU machine starts from NaN-filled allocator memory."""
    if torch.cuda.is_available():
        poison_cuda_allocator()
    yield


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty that returns NaNs, so any output element a kernel does not write shows up
    (the Triton tests' counterpart of poison_cuda, for kernels that run in the interpreter)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(scope="session")
def benchmark_module():
    """benchmark_module("bench_lora_linear"): a module of benchmarks/, which is not part of the installed
    package, imported from the checkout as `python -m benchmarks.<name>` does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT))
        yield lambda name: importlib.import_module(f"benchmarks.{name}")


def _backend_param(name: str):
    """A backend as a test parameter, skipped (with lowrank's reason) where it cannot run the
    tests' tensors: CUDA tensors on a GPU machine, CPU tensors elsewhere."""
    import lowrank

    status = lowrank.backends()[name]
    if status.available and name == "cpu" and torch.cuda.is_available():
        status = status._replace(available=False, reason="backend 'cpu' takes CPU tensors; tests run on cuda")
    return pytest.param(name, marks=pytest.mark.skipif(not status.available, reason=status.reason), id=name)


@pytest.fixture(params=[_backend_param(name) for name in ("torch", "cpu", "triton", "cuda")])
def backend(request):
    """Each of lowrank's backends in turn (tests of an op against its reference take it)."""
    return request.param


def _data_root_with(*domains: str) -> str:
    """The digit data root (lowrank.data.default_root) if it holds every domain's folder; else the test skips."""
    from lowrank.data import default_root

    try:
        root = default_root()
    except FileNotFoundError:
        pytest.skip("no digit data")
    missing = [domain for domain in domains if not (root / domain).is_dir()]
    if missing:
        pytest.skip(f"the digit data lacks {missing}")
    return str(root)


@pytest.fixture(scope="module")
def usps_root():
    """The digit data root holding USPS (test_finetune, test_distributed CLI runs)."""
    return _data_root_with("usps")


@pytest.fixture(scope="module")
def digits_root():
    """The digit data root holding MNIST, USPS and MNIST-M (the fine-tuning comparison)."""
    return _data_root_with("mnist", "usps", "mnist_m")


@pytest.fixture
def one_thread():
    """One torch thread for the test: small training runs are faster and do not fight other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
