"""Run by tests/finetune/test_distributed.py under torchrun (CPU, gloo): `distributed_worker.py plan.json out_dir`.

For every scenario of the plan each rank trains a tiny float64 SmallViT with the scenario's strategy and
distributed config; rank 0 then trains the same model as a single process on the same global batches.
Under out_dir/<scenario>/ it writes:
    distributed.safetensors, single.safetensors   the final full state_dicts (rank 0)
    rank<r>.json   per rank: checkpoint writes, DDP's reduced parameter count/bytes, the parameters
                   FSDP2 reduce-scattered, the error raised by resuming onto another base, the history
Scenario keys: name, strategy (make_strategy spec), train (TrainConfig fields), samples, seed,
checkpoint (train into a checkpoint dir), resume_after (first train that many epochs, then resume),
wrong_base (then resume that checkpoint onto a model from another seed).
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from lowrank.finetune import SmallViT, TrainConfig, Trainer, distributed, make_strategy, trainer as trainer_module


def tiny_vit(seed):
    torch.manual_seed(seed)
    return SmallViT(dim=16, depth=3, num_heads=2, mlp_ratio=2, patch_size=7)


def samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def full_state(model):
    return {k: distributed.full_tensor(v).detach().clone().contiguous() for k, v in model.state_dict().items()}


class Probe:
    """Records what rank-local machinery did: checkpoint writes and FSDP2 reduce-scatters."""

    def __init__(self):
        self.writes, self.reduced = 0, set()
        original_write = trainer_module.Trainer._write_checkpoint

        def write(trainer, *args):
            self.writes += 1
            original_write(trainer, *args)

        trainer_module.Trainer._write_checkpoint = write
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        original_reduce = _fsdp_param_group.foreach_reduce

        def reduce(fsdp_params, *args, **kwargs):
            self.reduced.update(p._param_fqn for p in fsdp_params)
            return original_reduce(fsdp_params, *args, **kwargs)

        _fsdp_param_group.foreach_reduce = reduce


def train(scenario, distributed_mode, output_dir=None, epochs=None, seed=None):
    train_config = {**scenario["train"], "progress": False, "distributed": distributed_mode}
    if epochs is not None:
        train_config["epochs"] = epochs
    trainer = Trainer(tiny_vit(scenario.get("seed", 0) if seed is None else seed),
                      make_strategy(scenario["strategy"]), samples(scenario["samples"]), samples(7, 1),
                      TrainConfig(**train_config), output_dir)
    trainer.fit()
    return trainer


def run(scenario, out, probe, rank):
    here = os.path.join(out, scenario["name"])
    checkpoint_dir = os.path.join(here, "run") if scenario.get("checkpoint") else None
    mode = scenario["train"]["distributed"]
    info = {}
    if scenario.get("resume_after"):
        train(scenario, mode, checkpoint_dir, epochs=scenario["resume_after"])
    probe.writes, probe.reduced = 0, set()
    trainer = train(scenario, mode, checkpoint_dir)
    info["checkpoint_writes"] = probe.writes
    info["fsdp_reduced"] = sorted(probe.reduced)
    info["trainable"] = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    info["history"] = [{k: v for k, v in e.items() if k != "seconds"} for e in trainer.history]
    if trainer._ddp is not None:
        logged = trainer._ddp._get_ddp_logging_data()
        info["ddp_parameter_tensors"] = logged["num_parameter_tensors"]
        info["ddp_parameter_bytes"] = logged["total_parameter_size_bytes"]
    state = full_state(trainer.model)
    if scenario.get("wrong_base"):
        try:
            train(scenario, mode, checkpoint_dir, seed=scenario.get("seed", 0) + 1)
            info["wrong_base_error"] = None
        except ValueError as error:
            info["wrong_base_error"] = str(error)
    if rank == 0:
        save_file(state, os.path.join(here, "distributed.safetensors"))
        save_file(full_state(train(scenario, None).model), os.path.join(here, "single.safetensors"))
    with open(os.path.join(here, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    distributed.barrier()


def main(plan_path, out):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # so distributed and single-process runs agree to ~1e-12
    with open(plan_path) as f:
        plan = json.load(f)
    probe = Probe()
    for scenario in plan:
        os.makedirs(os.path.join(out, scenario["name"]), exist_ok=True)
        run(scenario, out, probe, int(os.environ["RANK"]))
    gc.collect()  # free the runs' DDP/FSDP state (reference cycles) while the group is still alive
    dist.destroy_process_group()
    # Every result is written; skip interpreter finalisation, where gloo's threads can abort a rank
    # ("terminate called without an active exception", seen once in CI; cf. pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
