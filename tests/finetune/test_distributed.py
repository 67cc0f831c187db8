"""lowrank.finetune under torchrun: 2 CPU processes (gloo), DDP for every strategy and FSDP2 for LoRA and
adapters, each equal to a single process on the same global batches; checkpoints from rank 0 holding only
the trained tensors; resume; a checkpoint from another pre-trained base refused.

One torchrun job (tests/finetune/distributed_worker.py) runs every scenario; the tests read what it wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")

# Which parameters each strategy trains on the tiny ViT (as in test_finetune.py's CASES).
STRATEGIES = {
    "feature_extraction": {"name": "feature_extraction"},
    "feature_cache": {"name": "feature_extraction", "num_classes": 10, "cache_features": True},
    "full": {"name": "full_finetuning"},
    "last_block": {"name": "full_finetuning", "last_k": 1},
    "gradual_unfreeze": {"name": "full_finetuning", "unfreeze_every": 1, "lr_decay": 0.5},
    "lora": {"name": "lora", "r": 2, "backend": "torch"},
    "houlsby": {"name": "adapters", "placement": "houlsby", "bottleneck": 4},
    "pfeiffer": {"name": "adapters", "placement": "pfeiffer", "bottleneck": 4},
    "prompt": {"name": "prompt_tuning", "embeddings": "embed", "num_virtual_tokens": 3},
    "prefix": {"name": "prefix_tuning", "num_virtual_tokens": 3},
}
# 17 samples in global batches of 8: the last batch has 1 sample, so rank 1 runs a placeholder weighted 0
BASE_TRAIN = {"epochs": 2, "batch_size": 8, "lr": 1e-2}
PLAN = [
    *({"name": f"ddp-{case}", "strategy": spec, "samples": 17,
       "train": {**BASE_TRAIN, "distributed": "ddp", "epochs": 3 if case == "gradual_unfreeze" else 2,
                 "grad_accum": 2 if case in ("lora", "full") else 1,
                 # SGD sees a wrongly scaled gradient (AdamW would mostly normalise it away)
                 "optimizer": "sgd" if case in ("lora", "full", "feature_cache", "prompt") else "adamw"}}
      for case, spec in STRATEGIES.items()),
    {"name": "fsdp-lora", "strategy": STRATEGIES["lora"], "samples": 22,
     "train": {**BASE_TRAIN, "distributed": "fsdp", "grad_accum": 2, "max_grad_norm": 0.5}},
    {"name": "fsdp-houlsby", "strategy": STRATEGIES["houlsby"], "samples": 17,
     "train": {**BASE_TRAIN, "distributed": "fsdp", "optimizer": "sgd"}},
    *({"name": f"{mode}-lora-resume", "strategy": STRATEGIES["lora"], "samples": 17, "checkpoint": True,
       "resume_after": 1, "wrong_base": True,
       "train": {**BASE_TRAIN, "distributed": mode, "epochs": 3, "grad_accum": 2}}
      for mode in ("ddp", "fsdp")),
    {"name": "ddp-full-checkpoint", "strategy": STRATEGIES["last_block"], "samples": 17, "checkpoint": True,
     "train": {**BASE_TRAIN, "distributed": "ddp", "epochs": 1}},
]
SCENARIOS = {s["name"]: s for s in PLAN}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("distributed")
    (out / "plan.json").write_text(json.dumps(PLAN))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out / "plan.json"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def read(results, name, rank=0):
    return json.loads((results / name / f"rank{rank}.json").read_text())


def assert_same_weights(results, name):
    distributed, single = (load_file(results / name / f"{run}.safetensors") for run in ("distributed", "single"))
    assert set(distributed) == set(single)
    # float64 models; prompt and prefix parameters stay float32 by design, which bounds how close the runs get
    float32 = any(v.dtype == torch.float32 for v in single.values())
    rtol, atol = (1e-5, 1e-6) if float32 else (1e-9, 1e-11)
    for key in single:
        torch.testing.assert_close(distributed[key], single[key], rtol=rtol, atol=atol, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", [s["name"] for s in PLAN])
def test_distributed_run_equals_one_process_on_the_global_batch(results, name):
    assert_same_weights(results, name)
    infos = [read(results, name, rank) for rank in (0, 1)]
    assert infos[0]["history"] == infos[1]["history"]  # metrics are reduced over the ranks


def test_ddp_reduces_only_trainable_parameters(results):
    for case in ("lora", "houlsby", "prompt", "prefix", "feature_extraction"):
        info = read(results, f"ddp-{case}")
        single = load_file(results / f"ddp-{case}" / "single.safetensors")
        trainable = info["trainable"]
        assert info["ddp_parameter_tensors"] == len(trainable), case
        assert info["ddp_parameter_bytes"] == sum(single[n].numel() * single[n].element_size() for n in trainable), case
    # caching features: DDP wraps only the head
    assert read(results, "ddp-feature_cache")["ddp_parameter_tensors"] == 2
    # gradual unfreezing rebuilt the wrapper: in the last epoch it reduces the two blocks unfrozen since
    info = read(results, "ddp-gradual_unfreeze")
    assert info["ddp_parameter_tensors"] == len(info["trainable"])
    assert any(n.startswith("blocks.1.") for n in info["trainable"])


@pytest.mark.parametrize("name", ["fsdp-lora", "fsdp-houlsby"])
def test_fsdp_reduce_scatters_only_trainable_parameters(results, name):
    info = read(results, name)
    assert info["fsdp_reduced"] == info["trainable"]
    assert any("lora_" in n or "adapter" in n for n in info["trainable"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoint_from_rank0_holds_only_the_adapter_and_resumes(results, mode):
    name = f"{mode}-lora-resume"
    infos = [read(results, name, rank) for rank in (0, 1)]
    assert [info["checkpoint_writes"] for info in infos] == [2, 0]  # epochs 2 and 3 after resuming at 1
    saved = load_file(results / name / "run" / "checkpoint" / "model.safetensors")
    assert set(saved) == set(infos[0]["trainable"])
    assert all("lora_" in k or k.startswith("head.") for k in saved)
    assert_same_weights(results, name)  # resumed distributed run == uninterrupted single process
    error = infos[0]["wrong_base_error"]
    assert error and "another pre-trained base" in error and str(results / name / "run") in error


def test_full_finetuning_checkpoint_holds_the_whole_model(results):
    saved = load_file(results / "ddp-full-checkpoint" / "run" / "checkpoint" / "model.safetensors")
    assert set(saved) == set(load_file(results / "ddp-full-checkpoint" / "single.safetensors"))


def test_cli_trains_under_torchrun_with_ddp(tmp_path, usps_root):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    stage = {"name": "usps", "strategy": {"name": "lora", "r": 2, "backend": "torch"},
             "train_data": {"domain": "usps", "split": "train", "per_class": 2},
             "eval_data": {"domain": "usps", "split": "test", "limit": 40},
             "train": {"epochs": 2, "batch_size": 8, "progress": False, "distributed": "ddp"}}
    config = {"model": {"name": "cnn", "width": 4, "hidden": 16}, "data_root": usps_root,
              "output_dir": str(tmp_path / "run"), "stages": [stage]}
    (tmp_path / "run.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lowrank.finetune", "--config", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    printed = [line for line in done.stdout.splitlines() if '"stage": "usps"' in line]
    assert len(printed) == 1  # rank 0 alone reports
    result = json.loads(printed[0])
    assert result["epoch"] == 2 and 0.0 <= result["eval_accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    saved = load_file(tmp_path / "run" / "0-usps" / "checkpoint" / "model.safetensors")
    assert saved and all("lora_" in k or k.startswith("head.") for k in saved)
