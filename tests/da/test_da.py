"""lowrank.da: seeded training, exact resume, the DANN gradient, bad input, and the benchmark CLI.

Runs use tiny real samples (a few dozen images) and a few steps: they check behaviour, not accuracy
(accuracy is the benchmark's job: python -m lowrank.da.bench).
"""

import json
import math
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lowrank import data as lowrank_data
from lowrank.da import (
    ADDA,
    DANN,
    METHODS,
    Classifier,
    CoGAN,
    Discriminator,
    DomainConfusion,
    LeNetEncoder,
    SourceOnly,
    bench,
    build_network,
    get_task,
    load_task_data,
    make_loader,
    make_method,
)
from lowrank.da.tasks import variant_suffix

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def data():
    return load_task_data("mnist-usps", seed=0, n_source=48, n_target=40, n_test=64)


def short(name: str, steps: int = 3) -> dict:
    """Step-count overrides giving `steps` steps per phase."""
    return {k: steps for k in ("steps", "source_steps", "adapt_steps") if k in METHODS[name].defaults}


def loaders(data, seed=0, batch_size=16):
    return make_loader(data.source_train, batch_size, seed), make_loader(data.target_train, batch_size, seed + 1)


def states(method) -> dict:
    return {f"{m}.{k}": v.clone() for m, module in method._modules().items() for k, v in module.state_dict().items()}


def assert_same_states(a, b):
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", list(METHODS))
def test_fit_is_deterministic_under_a_seed_and_leaves_global_rng_alone(data, name):
    runs = []
    for _ in range(2):
        before = torch.get_rng_state()
        method = make_method(name, "mnist-usps", seed=3, progress=False, **short(name))
        method.fit(*loaders(data))
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(method)
    assert_same_states(*runs)
    assert runs[0].history == runs[1].history
    other = make_method(name, "mnist-usps", seed=4, progress=False, **short(name))
    other.fit(*loaders(data))
    assert not torch.equal(states(other)["classifier.layers.2.weight"], states(runs[0])["classifier.layers.2.weight"])


@pytest.mark.parametrize("name,every", [(n, 4) for n in METHODS] + [("adda", 3)])
def test_resume_equals_uninterrupted(data, tmp_path, name, every):
    # 7 steps per phase-sum, batches of 16 from 48 / 40 images: checkpoints fall mid-epoch and the
    # run crosses epoch boundaries after them; ADDA at every=3 resumes exactly at its phase change.
    steps = {k: (3 if k == "source_steps" and name == "adda" else 7) for k in short(name)}
    if name == "adda":
        steps["adapt_steps"] = 4
    whole = make_method(name, "mnist-usps", seed=1, progress=False, log_every=1, **steps).fit(*loaders(data))

    path = tmp_path / "ckpt.pt"
    log = tmp_path / "log.json"
    first = make_method(name, "mnist-usps", seed=1, progress=False, log_every=1, checkpoint_path=path,
                        checkpoint_every=every, log_path=log, **steps)
    first.fit(*loaders(data))
    saved_step = (first.total_steps // every) * every
    assert torch.load(path, weights_only=True)["step"] == saved_step
    resumed = make_method(name, "mnist-usps", seed=1, progress=False, log_every=1, **steps).load_checkpoint(path)
    assert resumed.step == saved_step
    resumed.fit(*loaders(data))  # fresh loaders, as after a restart
    assert_same_states(whole, resumed)
    assert resumed.history == whole.history
    logged = json.loads(log.read_text())
    assert logged["method"] == name and logged["step"] == first.total_steps and logged["history"] == whole.history


def test_resume_with_loaders_shuffling_from_the_global_generator(data, tmp_path):
    def plain_loaders():  # no generator of their own: the order comes from the method's private RNG stream
        return (DataLoader(data.source_train, 16, shuffle=True, drop_last=True),
                DataLoader(data.target_train, 16, shuffle=True, drop_last=True))

    whole = SourceOnly("mnist-usps", seed=2, progress=False, source_steps=8).fit(*plain_loaders())
    path = tmp_path / "ckpt.pt"
    SourceOnly("mnist-usps", seed=2, progress=False, source_steps=8, checkpoint_path=path, checkpoint_every=5
               ).fit(*plain_loaders())
    torch.manual_seed(12345)  # the caller's global RNG state must not matter
    resumed = SourceOnly("mnist-usps", seed=2, progress=False, source_steps=8).load_checkpoint(path)
    resumed.fit(*plain_loaders())
    assert_same_states(whole, resumed)


def test_dann_step_reverses_the_domain_gradient_into_the_encoder(data):
    torch.manual_seed(0)
    method = DANN("mnist-usps", seed=0, progress=False)
    for module in method._modules().values():
        module.eval()  # no dropout: the reference below sees the same network
    method.grl.lambda_ = 0.7
    xs, ys = next(iter(make_loader(data.source_train, 16, 0)))
    (xt,) = next(iter(make_loader(data.target_train, 8, 1)))

    # Reference: L_y and L_d differentiated separately, without any gradient reversal; L_d is the
    # paper's source mean plus target mean (unequal batches: not the pooled mean, nor twice it).
    params = {n: p for n, p in method.encoder.named_parameters()}
    disc_params = dict(method.discriminator.named_parameters())
    features = method.encoder(torch.cat([xs, xt]))
    class_loss = F.cross_entropy(method.classifier(features[:16]), ys)
    domain_logits = method.discriminator(features)
    domain_loss = (F.cross_entropy(domain_logits[:16], torch.zeros(16, dtype=torch.long))
                   + F.cross_entropy(domain_logits[16:], torch.ones(8, dtype=torch.long)))
    grad_y = torch.autograd.grad(class_loss, list(params.values()), retain_graph=True)
    grad_d = torch.autograd.grad(domain_loss, list(params.values()) + list(disc_params.values()))

    seen = {}
    step = method.optimizer.step
    method.optimizer.step = lambda: (seen.update({n: p.grad.clone() for n, p in params.items()}),
                                     seen.update({"d." + n: p.grad.clone() for n, p in disc_params.items()}), step())
    record = method._train_step("adapt", _Once((xs, ys)), _Once((xt,)))
    assert record["lambda"] == pytest.approx(0.7)
    assert record["domain_loss"] == pytest.approx(domain_loss.item() / 2, rel=1e-5)
    for i, name in enumerate(params):  # θ_f moves along ∂L_y − λ ∂L_d
        torch.testing.assert_close(seen[name], grad_y[i] - 0.7 * grad_d[i], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(seen[name], grad_y[i] + 0.7 * grad_d[i], rtol=1e-4, atol=1e-6)
    for j, name in enumerate(disc_params):  # the domain classifier itself minimises L_d
        torch.testing.assert_close(seen["d." + name], grad_d[len(params) + j], rtol=1e-4, atol=1e-6)


class _Once:
    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch


def test_dann_schedules_follow_the_paper(data):
    method = DANN("mnist-usps", seed=0, progress=False, steps=10, log_every=1).fit(*loaders(data))
    for entry in method.history:
        p = (entry["step"] - 1) / 10
        assert entry["lambda"] == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1, abs=1e-9)
        assert entry["lr"] == pytest.approx(0.01 / (1 + 10 * p) ** 0.75)


def test_adda_keeps_source_model_fixed_and_starts_target_encoder_from_it(data):
    method = ADDA("mnist-usps", seed=0, progress=False, source_steps=3, adapt_steps=0).fit(*loaders(data))
    assert_same_states_modules(method.encoder, method.target_encoder)
    source_before = {k: v.clone() for k, v in {**method.encoder.state_dict(), **method.classifier.state_dict()}.items()}
    method = ADDA("mnist-usps", seed=0, progress=False, source_steps=3, adapt_steps=3).fit(*loaders(data))
    for key, value in {**method.encoder.state_dict(), **method.classifier.state_dict()}.items():
        torch.testing.assert_close(value, source_before[key], rtol=0, atol=0)
    assert not torch.equal(method.encoder.fc.weight, method.target_encoder.fc.weight)
    x, _ = data.target_test[0:4]
    with torch.no_grad():
        torch.testing.assert_close(method.predict(x), method.classifier(method.target_encoder(x)))


def assert_same_states_modules(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_evaluate_counts_correct_predictions(data):
    method = SourceOnly("mnist-usps", seed=0, progress=False, source_steps=1)
    loader = make_loader(data.target_test, 10, 0, shuffle=False, drop_last=False)
    x = data.target_test.images
    expected = (method.predict(x).argmax(1) == data.target_test.labels).float().mean().item()
    assert method.evaluate(loader) == pytest.approx(expected)


# ------------------------------------------------------------------ bad input


def test_checkpoint_from_another_method_is_refused(data, tmp_path):
    path = tmp_path / "dann.pt"
    DANN("mnist-usps", seed=0, progress=False, steps=2, checkpoint_path=path, checkpoint_every=2).fit(*loaders(data))
    with pytest.raises(ValueError, match="checkpoint of method 'dann' cannot be loaded into ADDA"):
        ADDA("mnist-usps", seed=0, progress=False).load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint task 'mnist-usps' differs"):
        DANN("usps-mnist", seed=0, progress=False, steps=2).load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint hparams"):
        DANN("mnist-usps", seed=0, progress=False, steps=5).load_checkpoint(path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        DANN("mnist-usps", seed=0, progress=False, steps=2).load_checkpoint(corrupt)
    with pytest.raises(FileNotFoundError, match="no file"):
        DANN("mnist-usps", seed=0, progress=False).load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("cls", [DANN, ADDA, DomainConfusion])
def test_encoder_and_discriminator_size_mismatch(cls):
    with pytest.raises(ValueError, match=r"encoder outputs 500 features but the discriminator takes 128"):
        cls("mnist-usps", discriminator=Discriminator(in_features=128), progress=False)
    # A matching pair of a custom size is fine: the heads default to the encoder's size.
    cls("mnist-usps", encoder=LeNetEncoder(feature_dim=64), progress=False)
    with pytest.raises(ValueError, match=r"encoder outputs 64 features but the classifier takes 500"):
        cls("mnist-usps", encoder=LeNetEncoder(feature_dim=64), classifier=Classifier(500), progress=False)


def test_modules_name_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"Discriminator: expects features \[N, 500\].*got \[4, 64\]"):
        Discriminator()(torch.zeros(4, 64))
    with pytest.raises(ValueError, match=r"LeNetEncoder: images must be \[N, 3, 32, 32\], got \[2, 1, 28, 28\]"):
        LeNetEncoder(3, 32)(torch.zeros(2, 1, 28, 28))


def test_unknown_task_method_and_hyper_parameter():
    with pytest.raises(ValueError, match="unknown task 'mnist-svhn': expected one of mnist-usps"):
        get_task("mnist-svhn")
    with pytest.raises(ValueError, match="unknown task"):
        DANN("mnist-svhn")
    with pytest.raises(ValueError, match="unknown method 'cycada'"):
        make_method("cycada")
    with pytest.raises(TypeError, match=r"DANN: unknown hyper-parameter\(s\) \['learning_rate'\]"):
        DANN("mnist-usps", learning_rate=0.1)
    with pytest.raises(ValueError, match=r"DANN: steps must be an integer of at least 1, got '10'"):
        DANN("mnist-usps", steps="10")


def test_missing_and_corrupt_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv"):
        load_task_data("mnist-usps", 0, root=tmp_path)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist_5k.csv").write_text("1,2,3\n")
    with pytest.raises(ValueError, match="785 columns"):
        load_task_data("mnist-usps", 0, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_task_data("svhn-mnist", 0)


def test_empty_loader_is_reported(data):
    empty = DataLoader(data.source_train, batch_size=1000, drop_last=True)
    with pytest.raises(ValueError, match="the source loader yields no batches"):
        SourceOnly("mnist-usps", progress=False, source_steps=1).fit(empty, make_loader(data.target_train, 8, 0))


# ------------------------------------------------------------------ protocol and CLI


def test_protocol_sizes_and_unlabelled_target():
    task = load_task_data("mnist-usps", seed=0)
    assert (len(task.source_train), len(task.target_train), len(task.target_test)) == (2000, 1800, 2007)
    assert task.source_train.images.shape[1:] == (1, 28, 28) and task.target_test.images.shape[1:] == (1, 28, 28)
    assert len(task.target_train[0]) == 1  # images only: no target labels to leak into training
    other = load_task_data("mnist-usps", seed=1)
    assert not torch.equal(task.source_train.images, other.source_train.images)
    mnistm = load_task_data("mnist-mnistm", seed=0, n_source=32)
    assert mnistm.source_train.images.shape[1:] == (3, 28, 28)
    assert len(mnistm.target_train) + len(mnistm.target_test) == 9001 and len(mnistm.target_test) == 3000
    test_images = mnistm.target_test.images.flatten(1)
    pool_images = mnistm.target_train.images.flatten(1)
    assert not (torch.cdist(pool_images[:500], test_images) == 0).any()  # disjoint parts of the file


def test_mnistm_source_never_holds_the_digits_behind_the_evaluation_images():
    task = get_task("mnist-mnistm", normalisation="fixed")
    data = load_task_data(task, seed=0)
    assert (len(data.source_train), len(data.source_val)) == (11_500, 500)  # of mnist_5k's 5000 and 7000 test digits
    mnist_test = lowrank_data.load_digits("mnist", "test")
    pool, evaluation = lowrank_data.target_pool_eval_split(9001, 3000, seed=0)  # MNIST-M test image i: MNIST test i
    prepare = lambda arrays: lowrank_data.prepare_images(arrays.images, 28, 3, 0.5, 0.5)  # noqa: E731
    digits = lambda images: {image.numpy().tobytes() for image in images}  # noqa: E731
    source = digits(data.source_train.images) | digits(data.source_val.images)
    assert not source & digits(prepare(mnist_test.subset(evaluation)))
    assert digits(prepare(mnist_test.subset(pool))) <= source  # and every other test digit is in
    with pytest.raises(ValueError, match="source_test_digits needs MNIST -> the MNIST-M test file"):
        replace(get_task("usps-mnist"), source_test_digits=True)


def ink_box(images: torch.Tensor, threshold: float = 0.0) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows/columns, inclusive, holding any pixel above `threshold` in the
    normalised images [N, 1, H, W] (background -1 after (x - 0.5) / 0.5)."""
    ink = (images > threshold).any(0)[0]
    rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


def test_usps_framing_puts_digits_in_mnists_20x20_box():
    boxed = load_task_data("mnist-usps", seed=0, n_source=200, n_target=200, n_test=200)
    stretched = load_task_data(get_task("mnist-usps", framing="stretch"), seed=0, n_source=200, n_target=200,
                               n_test=200)
    assert get_task("mnist-usps").framing == "mnist_box" and get_task("usps-mnist").framing == "mnist_box"
    for images in (boxed.target_test.images, boxed.target_train.images):
        assert images.shape[1:] == (1, 28, 28)
        assert ink_box(images, -1.0 + 1e-6) == (4, 23, 4, 23)  # nothing outside the centred 20x20 box
        assert (images[:, :, :4] == -1).all() and (images[:, :, 24:] == -1).all()
    top, bottom, left, right = ink_box(stretched.target_test.images, 0.0)
    assert bottom - top + 1 > 24 and right - left + 1 > 24  # the plain upscale fills the frame
    torch.testing.assert_close(boxed.source_train.images, stretched.source_train.images, rtol=0, atol=0)  # MNIST as is
    # Per image, the boxed USPS digit is about as tall as the MNIST ones (within 2 pixels on the mean).
    heights = lambda x: torch.stack([torch.tensor(ink_box(i[None], 0.0)) for i in x]).float()  # noqa: E731
    usps_h, mnist_h = heights(boxed.target_test.images[:100]), heights(boxed.source_train.images[:100])
    usps_height, mnist_height = (usps_h[:, 1] - usps_h[:, 0]).mean(), (mnist_h[:, 1] - mnist_h[:, 0]).mean()
    assert abs(usps_height - mnist_height) < 2, (usps_height, mnist_height)
    usps_source = load_task_data("usps-mnist", seed=0, n_source=100, n_target=20, n_test=20)
    assert ink_box(usps_source.source_train.images, -1.0 + 1e-6) == (4, 23, 4, 23)


def test_per_domain_normalisation_uses_each_domains_training_statistics():
    task = get_task("mnist-mnistm", normalisation="per_domain")
    normalised = load_task_data(task, seed=0, n_source=300, n_target=400, n_test=200)
    raw = load_task_data(get_task("mnist-mnistm", normalisation="fixed"), seed=0, n_source=300, n_target=400,
                         n_test=200)
    for images in (normalised.source_train.images, normalised.target_train.images):
        torch.testing.assert_close(images.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(images.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    # The test split and the source validation set reuse their domain's training statistics, not their own.
    pool = raw.target_train.images
    mean, std = pool.mean((0, 2, 3), keepdim=True), pool.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(normalised.target_test.images, (raw.target_test.images - mean) / std, atol=1e-4, rtol=0)
    source = raw.source_train.images
    mean, std = source.mean((0, 2, 3), keepdim=True), source.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(normalised.source_val.images, (raw.source_val.images - mean) / std, atol=1e-4, rtol=0)
    assert raw.source_train.images.min() == -1 and raw.source_train.images.max() == 1  # fixed: (x - 0.5) / 0.5
    with pytest.raises(ValueError, match="normalisation must be one of fixed, per_domain"):
        get_task("mnist-usps", normalisation="batch")


def test_augmentation_warps_training_images_only_and_fills_with_background():
    assert get_task("mnist-usps").augment and get_task("usps-mnist").augment and not get_task("mnist-mnistm").augment
    augmented = load_task_data("usps-mnist", seed=0, n_source=20, n_target=20, n_test=20)
    plain = load_task_data(get_task("usps-mnist", augment=False), seed=0, n_source=20, n_target=20, n_test=20)
    assert plain.source_train.transform is None and plain.target_train.transform is None
    for dataset in (augmented.source_train, augmented.target_train):
        torch.testing.assert_close(dataset.images, getattr(plain, "source_train" if dataset is augmented.source_train
                                                           else "target_train").images, rtol=0, atol=0)
        first, again = dataset[3][0], dataset[3][0]
        assert first.shape == dataset.images[3].shape and not torch.equal(first, again)  # a new warp per read
        assert first.min() >= -1 - 1e-6 and (first == -1).float().mean() > 0.3  # outside the digit: background
    for split in ("source_val", "target_test"):
        assert getattr(augmented, split).transform is None
    # per_domain normalisation: the fill is each channel's normalised black, so a black image stays black.
    task = get_task("mnist-mnistm", augment=True, normalisation="per_domain")
    mnistm = load_task_data(task, seed=0, n_source=20, n_target=20, n_test=20)
    fill = mnistm.target_train.transform.fill
    assert fill.shape == (3, 1, 1)
    black = fill.expand(3, 28, 28).clone()
    torch.testing.assert_close(mnistm.target_train.transform(black), black, rtol=0, atol=1e-6)


def test_framing_and_network_choices_are_checked():
    with pytest.raises(ValueError, match="framing must be one of mnist_box, stretch"):
        get_task("mnist-usps", framing="crop")
    with pytest.raises(ValueError, match="task mnist-mnistm: has no USPS domain"):
        get_task("mnist-mnistm", framing="stretch")
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        build_network("resnet", "encoder")
    with pytest.raises(ValueError, match="unknown network part 'head'"):
        build_network("lenet", "head")
    with pytest.raises(ValueError, match="box must lie in 1..size"):
        lowrank_data.prepare_images(torch.zeros(1, 16, 16, 1, dtype=torch.uint8).numpy(), size=28, box=19)


def test_mnistm_uses_the_dann_papers_network():
    dann = DANN("mnist-mnistm", progress=False)
    convs = [m for m in dann.encoder.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 48)]
    assert dann.encoder.out_features == 768 and isinstance(dann.encoder.fc, torch.nn.Identity)  # the paper's 48*4*4
    assert (
        dann.hparams["steps"] == 11000 and DANN("mnist-usps", progress=False).hparams["steps"] == 2000
    )  # TASK_DEFAULTS
    assert DANN("mnist-mnistm", steps=7, progress=False).hparams["steps"] == 7  # a keyword still wins
    widths = lambda module: [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert widths(dann.classifier) == [100, 100, 10] and widths(dann.discriminator) == [100, 2]
    assert dann.predict(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    # channels_last is a speed choice only: the same weights give the same features up to rounding.
    assert convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = LeNetEncoder(3, 28, feature_dim=None, dropout=0.0, widths=(32, 48))
    assert not plain.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    dann.encoder.load_state_dict(plain.state_dict())
    assert convs[0].weight.is_contiguous(memory_format=torch.channels_last)  # loading keeps the layout
    images = torch.randn(5, 3, 28, 28)
    torch.testing.assert_close(dann.encoder(images), plain(images), rtol=1e-5, atol=1e-5)
    assert widths(DANN("mnist-usps", progress=False).discriminator) == [500, 500, 2]  # ADDA's, for MNIST<->USPS


def test_batch_norm_network_and_task_variants():
    task = get_task("mnist-mnistm", network="dann_mnist_bn")
    dann = DANN(task, progress=False)
    norms = lambda module: [type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__]  # noqa: E731
    assert norms(dann.encoder) == ["BatchNorm2d"] * 2
    assert norms(dann.classifier) == ["BatchNorm1d"] * 2 and norms(dann.discriminator) == ["BatchNorm1d"]
    assert isinstance(dann.encoder.features[0], torch.nn.Conv2d)  # CoGAN's target stream replaces features[0]
    assert [k for k in LeNetEncoder().state_dict()] == ["features.0.weight", "features.0.bias", "features.3.weight",
                                                         "features.3.bias", "fc.weight", "fc.bias"]  # keys as before
    cogan = CoGAN(get_task("mnist-usps", network="dann_mnist_bn"), progress=False)
    assert cogan.predict(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        get_task("mnist-usps", network="resnet")
    assert variant_suffix(get_task("mnist-mnistm")) == ""
    assert variant_suffix(get_task("mnist-usps", framing="stretch", network="dann_mnist", augment=False)) == \
        "_stretch_dann_mnist_noaugment"


def test_bench_cli_quick(tmp_path, capsys):
    rc = bench.main(["--task", "mnist-usps", "--method", "source_only,adda", "--seeds", "2", "--quick",
                     "--no-progress", "--out-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| adda |" in out and "0.894 ± 0.002" in out and "0.752 ± 0.016" in out
    report = json.loads((tmp_path / "da_mnist-usps_source_only+adda_quick.json").read_text())
    assert [row["method"] for row in report["summary"]] == ["source_only", "adda"]
    assert len(report["runs"]) == 4 and all(0.0 <= r["target_accuracy"] <= 1.0 for r in report["runs"])
    assert report["framing"] == "mnist_box" and report["network"] == "lenet"
    assert report["threads"] == torch.get_num_threads()  # no --threads: torch's own count, recorded
    pytest.importorskip("matplotlib")
    assert (tmp_path / "da_mnist-usps_source_only+adda_quick.png").stat().st_size > 0


def test_bench_cli_framing_and_normalisation_name_their_files(tmp_path, capsys):
    assert bench.main(["--task", "usps-mnist", "--method", "source_only", "--seeds", "1", "--quick", "--framing",
                       "stretch", "--normalisation", "per_domain", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    assert (
        "usps-mnist (lenet network, USPS framing stretch, per_domain normalisation, augmented)"
        in capsys.readouterr().out
    )
    report = json.loads((tmp_path / "da_usps-mnist_source_only_stretch_per_domain_quick.json").read_text())
    assert report["framing"] == "stretch" and report["normalisation"] == "per_domain"
    assert bench.main(["--task", "mnist-usps", "--method", "source_only", "--seeds", "1", "--quick", "--augment",
                       "off", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    assert "fixed normalisation): target test" in capsys.readouterr().out
    assert json.loads((tmp_path / "da_mnist-usps_source_only_noaugment_quick.json").read_text())["augment"] is False
    with pytest.raises(SystemExit):
        bench.main(["--task", "mnist-mnistm", "--framing", "stretch", "--out-dir", str(tmp_path)])
    assert "has no USPS domain" in capsys.readouterr().err


def test_bench_cli_sets_hyper_parameters_of_one_method(tmp_path, capsys):
    assert bench.main(["--task", "mnist-usps", "--method", "dann", "--set", "lr=0.003", "--set", "steps=4", "--seeds",
                       "1", "--quick", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "da_mnist-usps_dann_lr0.003_steps4_quick.json").read_text())
    assert report["runs"][0]["hparams"]["lr"] == 0.003 and report["runs"][0]["hparams"]["steps"] == 4
    assert report["runs"][0]["history"][-1]["step"] == 4
    for argv, message in ((["--method", "all", "--set", "lr=0.1"], "--set needs exactly one --method"),
                          (["--method", "adda", "--set", "lr=0.1"], "adda has no hyper-parameter 'lr'"),
                          (["--method", "dann", "--set", "lr=0.1,0.2"], "expected one value"),
                          (["--method", "dann", "--set", "lr=abc"], "'lr=abc': lr must be a finite number, got 'abc'"),
                          (["--method", "dann", "--set", "lr=-1"], "'lr=-1': lr (a learning rate) must be positive"),
                          (["--method", "dann", "--set", "steps=0"], "'steps=0': steps must be an integer of at least"),
                          (["--method", "dann", "--set", "batch_size=0"], "batch_size must be an integer of at least"),
                          (["--method", "dann", "--set", "momentum=1.5"], "momentum must lie in [0, 1)"),
                          (["--method", "dann", "--set", "grl_backend=gpu"], "grl_backend: backend must be None")):
        with pytest.raises(SystemExit):
            bench.main(["--task", "mnist-usps", *argv, "--out-dir", str(tmp_path)])
        assert message in capsys.readouterr().err


def test_bench_cli_names_a_missing_h5py(tmp_path, capsys, monkeypatch):
    from lowrank.da import tasks

    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    tasks._load.cache_clear()  # USPS must be read again
    try:
        assert bench.main(["--task", "mnist-usps", "--quick", "--out-dir", str(tmp_path)]) == 2
    finally:
        tasks._load.cache_clear()
    err = capsys.readouterr().err
    assert "cannot load the data for task mnist-usps" in err and "reading USPS from HDF5" in err
    assert "needs h5py: pip install h5py" in err and "Traceback" not in err


def test_bench_cli_errors(tmp_path, capsys):
    assert bench.main(["--task", "svhn-mnist", "--quick", "--out-dir", str(tmp_path)]) == 2
    assert "train_32x32.mat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--task", "mnist-svhn", "--out-dir", str(tmp_path)])
    assert "unknown task 'mnist-svhn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--task", "mnist-usps", "--method", "cogan2", "--out-dir", str(tmp_path)])
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--task", "mnist-usps", "--threads", "0", "--out-dir", str(tmp_path)])
    assert "expected an integer of at least 1, got 0" in capsys.readouterr().err


def test_cogan_shares_all_but_the_first_convolution(data):
    method = CoGAN("mnist-usps", seed=0, progress=False, steps=2).fit(*loaders(data))
    assert method.target_stream.encoder[0] is method.encoder
    x = data.target_test.images[:4]
    with torch.no_grad():
        method._set_train_mode(False)
        by_hand = method.encoder.fc(method.encoder.features[1:](method.target_stream.first(x)))
        torch.testing.assert_close(method.predict(x), method.classifier(by_hand))
        assert not torch.allclose(method.target_stream.first.weight, method.encoder.features[0].weight)
        fake_s, fake_t = method.generators(torch.randn(3, 100))
    assert fake_s.shape == fake_t.shape == (3, 1, 28, 28) and fake_s.abs().max() <= 1
    with pytest.raises(ValueError, match="CoGAN: the encoder must have an integer `out_features`"):
        CoGAN("mnist-usps", encoder=torch.nn.Sequential(), progress=False)
    custom = torch.nn.Sequential()
    custom.out_features = 500
    with pytest.raises(ValueError, match="CoGAN: the encoder must be a LeNetEncoder"):
        CoGAN("mnist-usps", encoder=custom, progress=False)
    with pytest.raises(ValueError, match="CoGAN: takes no discriminator"):
        CoGAN("mnist-usps", discriminator=Discriminator(), progress=False)


def test_progress_bar_on_stderr(data, capsys):
    SourceOnly("mnist-usps", seed=0, source_steps=2, progress=True).fit(*loaders(data))
    assert "source_only mnist-usps seed 0" in capsys.readouterr().err
    SourceOnly("mnist-usps", seed=0, source_steps=2, progress=False).fit(*loaders(data))
    assert capsys.readouterr().err == ""
