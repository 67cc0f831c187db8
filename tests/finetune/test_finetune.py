"""lowrank.finetune: what each strategy trains, trainer exactness (resume, accumulation, clipping), multi-stage, CLI."""

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lowrank.finetune import (
    FeatureExtraction,
    FullFineTuning,
    MultiStage,
    SmallCNN,
    SmallViT,
    Stage,
    TrainConfig,
    Trainer,
    make_strategy,
    trainer as trainer_module,
)
from lowrank.finetune.cli import main
from lowrank.tuners.lora.model import lora_layers


def tiny_vit():
    return SmallViT(dim=16, depth=3, num_heads=2, mlp_ratio=2, patch_size=7)


def tiny_cnn():
    return SmallCNN(width=4, hidden=16)


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def config(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 8, "progress": False, **kw})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Which parameters each strategy trains (full names as a regex), on the tiny ViT.
CASES = {
    "feature_extraction": ({"name": "feature_extraction"}, r"head\..*"),
    "full": ({"name": "full_finetuning"}, r".*"),
    "last_block": ({"name": "full_finetuning", "last_k": 1}, r"(blocks\.2\..*|norm\..*|head\..*)"),
    "lora": ({"name": "lora", "r": 2, "backend": "torch"}, r"(.*lora_[AB]|head\..*)"),
    "houlsby": ({"name": "adapters", "placement": "houlsby", "bottleneck": 4}, r"(.*\.adapter\..*|head\..*)"),
    "pfeiffer": ({"name": "adapters", "placement": "pfeiffer", "bottleneck": 4}, r"(.*mlp\.adapter\..*|head\..*)"),
    "prompt": ({"name": "prompt_tuning", "embeddings": "embed", "num_virtual_tokens": 3},
               r"(embed\.soft_prompt\.weight|head\..*)"),
    "prefix": ({"name": "prefix_tuning", "num_virtual_tokens": 3}, r"(.*attn\.prefix\..*|head\..*)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_trains_exactly_its_parameters(case):
    spec, pattern = CASES[case]
    trainer = Trainer(tiny_vit(), make_strategy(spec), data(), config=config(lr=1e-2))
    model = trainer.model
    names = {n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if re.fullmatch(pattern, n)} and trainable
    if case == "prefix":
        assert sum(type(m).__name__ == "PrefixAttention" for m in model.modules()) == 3
    before = snapshot(model)
    trainer.fit()
    params = dict(model.named_parameters())
    for name in names:
        changed = not torch.equal(before[name], params[name].detach())
        # lora_A starts with a zero gradient (B = 0); every other trainable tensor must move in one step
        assert changed == (name in trainable) or name.endswith("lora_A"), name
    assert trainer.trainable_parameters == sum(params[n].numel() for n in trainable)


def test_feature_extraction_cache_matches_uncached_and_keeps_backbone_in_eval():
    results = []
    for cache in (False, True):
        torch.manual_seed(0)
        model = tiny_cnn()
        model.blocks[2].insert(2, torch.nn.Dropout(0.5))  # eval mode must switch it off in both runs
        trainer = Trainer(model, FeatureExtraction(num_classes=10, cache_features=cache), data(), data(8, 1),
                          config(epochs=2))
        trainer.fit()
        results.append((snapshot(trainer.model), trainer.history))
    (plain, plain_history), (cached, cached_history) = results
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-5, atol=1e-6)
    assert cached_history[-1]["eval_accuracy"] == plain_history[-1]["eval_accuracy"]


def test_full_finetuning_discriminative_lrs_and_gradual_unfreeze():
    strategy = FullFineTuning(lr_decay=0.5, unfreeze_every=2)
    trainer = Trainer(tiny_vit(), strategy, data(), config=config(lr=0.1))
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == pytest.approx({f"depth{d}": 0.1 * 0.5**d for d in range(5)})
    depth = {id(p): g["name"] for g in trainer.optimizer.param_groups for p in g["params"]}
    model = trainer.model
    assert depth[id(model.head.weight)] == depth[id(model.norm.weight)] == "depth0"
    assert depth[id(model.blocks[2].mlp.fc1.weight)] == "depth1" and depth[id(model.embed.position)] == "depth4"
    expected = {0: {"depth0"}, 2: {"depth0", "depth1"}, 4: {"depth0", "depth1", "depth2"}, 8: set(groups)}
    for epoch, unfrozen in expected.items():
        strategy.on_epoch_start(model, epoch)
        assert {depth[id(p)] for p in model.parameters() if p.requires_grad} == unfrozen


def test_lora_finish_merges_and_unloads():
    torch.manual_seed(0)
    strategy = make_strategy({"name": "lora", "r": 2, "backend": "torch"})
    trainer = Trainer(tiny_vit(), strategy, data(), config=config(lr=1e-2))
    model = trainer.fit()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        merged = trainer.strategy.finish(model)
        assert not lora_layers(merged) and not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def interrupt_after(monkeypatch, n_checkpoints):
    """Make the n-th metrics write (right after the n-th epoch checkpoint) crash the run."""
    calls = {"n": 0}
    original = trainer_module.Trainer._write_metrics

    def crash(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == n_checkpoints:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(trainer_module.Trainer, "_write_metrics", crash)


def lora_run(output_dir, epochs=3, backend="torch", **changes):
    torch.manual_seed(123)  # the "pre-trained" model is the same in every run
    strategy = make_strategy({"name": "lora", "r": 2, "dropout": 0.25, "backend": backend})
    cfg = config(**{"epochs": epochs, "batch_size": 6, "grad_accum": 2, "max_grad_norm": 0.5, "scheduler": "cosine",
                    "warmup_steps": 1, **changes})
    return Trainer(tiny_vit(), strategy, data(), data(8, 1), cfg, output_dir)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = lora_run(tmp_path / "straight").fit()
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            lora_run(tmp_path / "resumed").fit()
    resumed_trainer = lora_run(tmp_path / "resumed")
    resumed = resumed_trainer.fit()
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    log = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    straight_log = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    without_time = [[{k: v for k, v in e.items() if k != "seconds"} for e in run["epochs"]]
                    for run in (log, straight_log)]
    assert without_time[0] == without_time[1]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    lora_run(tmp_path, epochs=1).fit()
    other = Trainer(tiny_cnn(), make_strategy({"name": "lora", "r": 2, "dropout": 0.25, "backend": "torch"}),
                    data(), None, config(epochs=1, batch_size=6, grad_accum=2, max_grad_norm=0.5,
                                         scheduler="cosine", warmup_steps=1), tmp_path)
    with pytest.raises(ValueError, match="saved from another model"):
        other.fit()


def test_lora_checkpoint_holds_only_the_trained_tensors_and_refuses_another_base(tmp_path):
    from safetensors.torch import load_file

    trainer = lora_run(tmp_path, epochs=1)
    trainer.fit()
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert set(saved) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(re.fullmatch(r".*lora_[AB]|head\..*", k) for k in saved)
    torch.manual_seed(123)
    base = tiny_vit()
    with torch.no_grad():
        base.blocks[0].attn.q_proj.weight.add_(1e-3)  # the same architecture with other pre-trained weights
    strategy = make_strategy({"name": "lora", "r": 2, "dropout": 0.25, "backend": "torch"})  # lora_run's
    other_base = Trainer(base, strategy, data(), config=trainer.config, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint was trained on another pre-trained base: "
                                         r"the frozen tensor\(s\) \['blocks.0.attn.q_proj"):
        other_base.fit()


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory):
    """The output_dir of lora_run after one epoch: copy it before damaging it."""
    output_dir = tmp_path_factory.mktemp("one_epoch")
    lora_run(output_dir, epochs=1).fit()
    return output_dir


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_meta(edit):
    def damage(directory):
        path = directory / "trainer.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("damage, message", [
    (lambda d: _flip_last_byte(d / "model.safetensors"), r"model.safetensors is corrupt: its tensors hash to sha256"),
    (lambda d: _flip_last_byte(d / "optimizer.safetensors"), r"optimizer.safetensors is corrupt"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
     r"model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "trainer.json").write_text((d / "trainer.json").read_text()[:100]),
     r"trainer.json is not valid JSON"),
    (lambda d: (d / "trainer.json").write_text("[1, 2]"), r"trainer.json holds a JSON list; expected an object"),
    (_edit_meta(lambda m: m.pop("history")), r"trainer.json lacks the field 'history'"),
    (_edit_meta(lambda m: m.pop("frozen_fingerprint")), r"trainer.json lacks the field 'frozen_fingerprint'"),
    (_edit_meta(lambda m: m.update(epoch=-1)), r"trainer.json has epoch=-1, step=\d+ and 1 history record"),
    (_edit_meta(lambda m: m.update(epoch=True)), r"trainer.json has epoch=True; expected a value of type int"),
], ids=["model-bit-flip", "optimizer-bit-flip", "model-truncated", "json-truncated", "json-list", "no-history",
        "no-fingerprint", "negative-epoch", "boolean-epoch"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(one_epoch_checkpoint, tmp_path, damage, message):
    """Resuming reads every checkpoint file whole and checks it: nothing damaged trains on silently."""
    shutil.copytree(one_epoch_checkpoint, tmp_path, dirs_exist_ok=True)
    damage(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(tmp_path / 'checkpoint'))}: .*{message}"):
        lora_run(tmp_path, epochs=1).fit()


@pytest.mark.parametrize("change", [{"batch_size": 4}, {"lr": 2e-3}, {"seed": 1}, {"amp": "bf16"},
                                    {"optimizer": "sgd"}, {"epochs": 2}])
def test_resume_under_a_changed_config_is_refused_naming_the_fields(one_epoch_checkpoint, tmp_path, change):
    shutil.copytree(one_epoch_checkpoint, tmp_path, dirs_exist_ok=True)
    (name, value), = change.items()
    with pytest.raises(ValueError, match=rf"written under another TrainConfig \({name} .* -> {value!r}\), which "
                                         "changes the result; .*change_config=True"):
        lora_run(tmp_path, **{"epochs": 1, **change}).fit()


def test_change_config_continues_as_a_new_segment(one_epoch_checkpoint, tmp_path):
    """adamw -> sgd with another lr: the new optimizer starts afresh, the log says from which epoch."""
    shutil.copytree(one_epoch_checkpoint, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="another TrainConfig"):  # not a KeyError from SGD meeting AdamW's state
        lora_run(tmp_path, epochs=2, optimizer="sgd", lr=5e-3).fit()
    trainer = lora_run(tmp_path, epochs=2, optimizer="sgd", lr=5e-3)
    trainer.fit(change_config=True)
    log = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    first, second = log["segments"]
    assert first["first_epoch"] == 1 and first["config"]["optimizer"] == "adamw"
    assert second["first_epoch"] == 2 and second["optimizer_state"] == "reset"
    assert second["changed"] == {"epochs": [1, 2], "optimizer": ["adamw", "sgd"], "lr": [1e-3, 5e-3]}
    assert all(group["base_lr"] == 5e-3 for group in trainer.optimizer.param_groups)


def test_more_epochs_of_a_constant_schedule_resume_like_a_longer_run(tmp_path):
    straight = lora_run(tmp_path / "straight", epochs=2, scheduler="constant").fit()
    lora_run(tmp_path / "resumed", epochs=1, scheduler="constant").fit()
    resumed = lora_run(tmp_path / "resumed", epochs=2, scheduler="constant").fit()
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_checkpoints_record_the_auto_picks_and_resume_pins_them(tmp_path, monkeypatch):
    """A resumed run must not measure again: a different pick would change its last bits."""
    from lowrank import autotune

    autotune.clear()
    lora_run(tmp_path, epochs=1, backend="auto", scheduler="constant").fit()
    recorded = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["autotune"]
    assert recorded and {row[0] for row in recorded} == {"lora_linear"}
    picks = autotune.choices()
    autotune.clear()

    def no_measuring(steps, device):
        raise AssertionError("a resumed run measured a backend again")

    monkeypatch.setattr(autotune, "time_interleaved", no_measuring)
    try:
        lora_run(tmp_path, epochs=2, backend="auto", scheduler="constant").fit()
        assert autotune.choices() == picks
    finally:
        autotune.clear()


def test_distributed_config_is_checked_before_anything_starts(monkeypatch):
    with pytest.raises(ValueError, match="distributed='fsdp' supports the lora and adapters strategies, not "
                                         "'full_finetuning'"):
        Trainer(tiny_vit(), make_strategy({"name": "full_finetuning"}), data(), config=config(distributed="fsdp"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="launch with `torchrun"):
        Trainer(tiny_vit(), make_strategy({"name": "lora", "r": 2}), data(), config=config(distributed="ddp"))
    with pytest.raises(ValueError, match="distributed must be None, 'ddp' or 'fsdp'"):
        config(distributed="deepspeed")


@pytest.mark.parametrize("micro_batch", [4, 5])
def test_gradient_accumulation_equals_one_big_batch(micro_batch):
    results = []
    for batch_size, accum in ((16, 1), (micro_batch, 4)):
        torch.manual_seed(0)
        trainer = Trainer(tiny_cnn(), make_strategy({"name": "full_finetuning"}), data(16),
                          config=config(batch_size=batch_size, grad_accum=accum, optimizer="sgd", momentum=0.0, lr=0.5))
        assert trainer._steps_per_epoch() == 1
        results.append(snapshot(trainer.fit()))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = data(16).tensors
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    max_norm = float(norm) / 10
    before = snapshot(model)
    model.zero_grad(set_to_none=True)
    trainer = Trainer(model, make_strategy({"name": "full_finetuning", "blocks": None}), data(16),
                      config=config(batch_size=16, optimizer="sgd", momentum=0.0, lr=1.0, max_grad_norm=max_norm))
    trainer.fit()
    for name, param in trainer.model.named_parameters():
        expected = before[name] - grads[name] * (max_norm / norm)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_on_cpu():
    trainer = Trainer(tiny_vit(), make_strategy({"name": "lora", "r": 2, "backend": "torch"}), data(), data(8, 1),
                      config(amp="bf16"))
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.history[-1].values())


def stages():
    lora = {"name": "lora", "r": 2, "dropout": 0.25, "backend": "torch"}
    return [
        Stage("first", make_strategy(lora), data(), data(8, 1), config(epochs=2, seed=1)),
        Stage("second", make_strategy({**lora, "r": 3}), data(24, 2), data(8, 1), config(epochs=2, seed=2)),
    ]


def multistage_run(output_dir):
    torch.manual_seed(7)
    return MultiStage(stages(), output_dir), tiny_vit()


def test_multistage_resumes_at_the_stage_where_it_stopped(tmp_path, monkeypatch):
    runner, model = multistage_run(tmp_path / "straight")
    straight = runner.run(model)
    assert not lora_layers(straight)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)  # stage "first" done (2 epochs), one epoch of "second"
        runner, model = multistage_run(tmp_path / "resumed")
        with pytest.raises(KeyboardInterrupt):
            runner.run(model)
    assert (tmp_path / "resumed" / "0-first" / "final.safetensors").is_file()
    assert not (tmp_path / "resumed" / "1-second" / "final.safetensors").exists()
    runner, model = multistage_run(tmp_path / "resumed")
    resumed = runner.run(model)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert [r["stage"] for r in runner.results] == ["second"]

    changed = MultiStage([stages()[0], Stage("other", make_strategy({"name": "full_finetuning"}), data())],
                         tmp_path / "resumed")
    with pytest.raises(ValueError, match="holds a run with other stages"):
        changed.run(tiny_vit())


def test_multistage_refuses_a_changed_config_of_a_finished_stage(tmp_path):
    runner, model = multistage_run(tmp_path)
    runner.run(model)
    changed = stages()
    changed[0].config = config(epochs=2, seed=1, lr=2e-3)
    with pytest.raises(ValueError, match=r"stage 0 'first' finished under another TrainConfig \(differing in "
                                         r"\['lr'\]; .*a finished stage is not trained again"):
        MultiStage(changed, tmp_path).run(tiny_vit())
    changed[0].config = config(epochs=2, seed=1, eval_batch_size=4)  # evaluation only: accepted
    MultiStage(changed, tmp_path).run(tiny_vit())


def test_multistage_joins_the_process_group_before_writing_files(tmp_path, monkeypatch):
    # Under torchrun every rank runs MultiStage; rank 0 is known only after joining the group.
    ddp = [Stage(s.name, s.strategy, s.train_data, s.eval_data, config(distributed="ddp")) for s in stages()]

    def join(device):
        assert not (tmp_path / "run").exists(), "stages.json was written before joining the process group"
        raise RuntimeError("joined")

    monkeypatch.setattr("lowrank.finetune.multistage.init_distributed", join)
    with pytest.raises(RuntimeError, match="joined"):
        MultiStage(ddp, tmp_path / "run").run(tiny_vit())
    with pytest.raises(ValueError, match="same distributed setting"):
        MultiStage([ddp[0], stages()[1]], tmp_path / "run")


def cli_config(tmp_path, root, **overrides):
    stage = {
        "name": "usps", "strategy": {"name": "lora", "r": 2, "backend": "torch"},
        "train_data": {"domain": "usps", "split": "train", "per_class": 2},
        "eval_data": {"domain": "usps", "split": "test", "limit": 40},
        "train": {"epochs": 1, "batch_size": 8, "progress": False},
    }
    return {"model": {"name": "cnn", "width": 4, "hidden": 16}, "data_root": root,
            "output_dir": str(tmp_path / "run"), "stages": [stage], **overrides}


def test_cli_runs_a_json_and_a_yaml_config(tmp_path, usps_root, capsys):
    config = cli_config(tmp_path, usps_root)
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert main(["--config", str(tmp_path / "run.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["stage"] == "usps" and 0.0 <= result["eval_accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "0-usps" / "metrics.json").read_text())["epochs"][0]["epoch"] == 1

    yaml = pytest.importorskip("yaml")
    config["output_dir"] = str(tmp_path / "run_yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "run.yaml")]) == 0


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(epochs=3), "unknown key(s) ['epochs']"),
    (lambda c: c["stages"][0]["train"].update(lrate=1), "stages[0].train: unknown key(s) ['lrate']"),
    (lambda c: c["stages"][0]["strategy"].update(name="lorax"), "unknown strategy 'lorax'"),
    (lambda c: c["stages"][0]["strategy"].update(rank=2), "unknown option(s) ['rank']"),
    (lambda c: c.update(data_root="/nonexistent/digits"), "data_root /nonexistent/digits does not exist"),
    (lambda c: c["model"].update(weights="/nonexistent/w.safetensors"), "no file /nonexistent/w.safetensors"),
])
def test_cli_rejects_bad_configs_clearly(tmp_path, usps_root, capsys, change, message):
    config = cli_config(tmp_path, usps_root)
    change(config)
    (tmp_path / "bad.json").write_text(json.dumps(config))
    assert main(["--config", str(tmp_path / "bad.json")]) == 2
    assert message in capsys.readouterr().err


def _stage(config):
    return config["stages"][0]


@pytest.mark.parametrize("change, message", [
    (lambda c: _stage(c)["train_data"].update(per_class="2"),
     "stages[0].train_data.per_class: expected an integer of at least 1, got '2'"),
    (lambda c: _stage(c)["train_data"].update(size=0), "stages[0].train_data.size: expected an integer of at least 1"),
    (lambda c: _stage(c)["train_data"].update(channels=3),
     "stages[0].train_data: images of 3 channel(s), 28x28, do not fit the model"),
    (lambda c: c["model"].update(depth=3), "model: unknown key(s) ['depth']; expected some of ['in_channels'"),
    (lambda c: c["model"].update(width="4"), "model.width: expected a value of type int (default 32), got '4'"),
    (lambda c: _stage(c)["train"].update(device="gpu0"), "stages[0].train: TrainConfig: device must name a torch"),
    (lambda c: _stage(c)["train"].update(lr="abc"), "stages[0].train: TrainConfig: lr must be a finite number"),
    (lambda c: c.update(model={"factory": "lowrank.finetune.models.SmallCNN"}),
     "model.factory: expected 'package.module:function', got 'lowrank.finetune.models.SmallCNN'"),
    (lambda c: c.update(output_dir=__file__), f"output_dir: {__file__} is a file; expected a directory"),
    (lambda c: c.update(resume="yes"), "resume: expected true or false, got 'yes'"),
])
def test_cli_errors_are_one_line_naming_file_key_and_expectation(tmp_path, usps_root, capsys, change, message):
    config = cli_config(tmp_path, usps_root)
    change(config)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_refuses_a_cuda_device_on_a_machine_without_one(tmp_path, usps_root, capsys):
    config = cli_config(tmp_path, usps_root)
    _stage(config)["train"]["device"] = "cuda"
    (tmp_path / "bad.json").write_text(json.dumps(config))
    assert main(["--config", str(tmp_path / "bad.json")]) == 2
    assert "stages[0].train: TrainConfig: device 'cuda', but no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("model: {name: cnn\noutput_dir: run\n", r"bad.yaml, line 2, column \d+: not valid YAML"),
    ("model: {name: cnn}\noutput_dir: a\nstages: []\noutput_dir: b\n",
     r"bad.yaml, line 4: key 'output_dir' appears twice in one mapping \(first at line 2\)"),
])
def test_cli_yaml_errors_name_the_file_and_line(tmp_path, capsys, text, message):
    pytest.importorskip("yaml")
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_cli_yaml_reads_exponent_numbers_as_numbers(tmp_path):
    pytest.importorskip("yaml")
    from lowrank.finetune.cli import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {name: cnn}\noutput_dir: run\n"
                    "stages:\n- {name: a, train: {lr: 1e-3, weight_decay: 5E-4}}\n")
    assert load_config(path)["stages"][0]["train"] == {"lr": 1e-3, "weight_decay": 5e-4}
