"""Multi-stage fine-tuning: a list of stages, each with its own data, strategy and training config.

Stage i trains the result of stage i-1 (after that stage's strategy.finish(): LoRA is merged into
the weights and removed, so a later LoRA stage starts a new adapter). Under output_dir:

    stages.json               the stage names, strategies and TrainConfigs (a resumed run must have the
                              same stages and strategies, and each finished stage the same TrainConfig
                              as far as its result goes: a finished stage is not trained again)
    <i>-<name>/checkpoint/    the stage's epoch checkpoint (Trainer)
    <i>-<name>/metrics.json   the stage's metrics log
    <i>-<name>/final.safetensors   the model after the stage and its finish()

run() resumes where a run stopped: finished stages are replayed for their structure only
(prepare + finish, no training), the last finished stage's weights are loaded, and the stage in
progress continues from its epoch checkpoint.

Under torchrun with distributed="ddp" stages (all stages or none), every rank runs the stages and
rank 0 alone writes the files. distributed="fsdp" is refused: it shards the model in place, so a
stage's result could not be finished (merged) and handed to the next stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from lowrank._files import read_json
from lowrank.finetune.distributed import barrier, init_distributed, is_main_process
from lowrank.finetune.strategies import Strategy
from lowrank.finetune.trainer import TrainConfig, Trainer, load_state, result_changes, save_state

__all__ = ["Stage", "MultiStage"]

FINAL = "final.safetensors"
PLAN = "stages.json"


@dataclass
class Stage:
    name: str
    strategy: Strategy
    train_data: Dataset
    eval_data: Dataset | None = None
    config: TrainConfig = field(default_factory=TrainConfig)


class MultiStage:
    def __init__(self, stages: list[Stage], output_dir: str | os.PathLike, loss_fn=None):
        if not stages:
            raise ValueError("MultiStage: needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"MultiStage: stage names must be unique, got {names}")
        sharded = [s.name for s in stages if s.config.distributed == "fsdp"]
        if sharded:
            raise ValueError(f"MultiStage: stage(s) {sharded} use distributed='fsdp', which shards the model in place "
                             "so it cannot pass to the next stage; use distributed='ddp' or a Trainer")
        settings = {s.config.distributed for s in stages}
        if len(settings) > 1:
            raise ValueError(f"MultiStage: every stage must use the same distributed setting, got "
                             f"{[(s.name, s.config.distributed) for s in stages]}")
        self.stages, self.output_dir, self.loss_fn = stages, os.fspath(output_dir), loss_fn
        self.results: list[dict] = []

    def stage_dir(self, index: int) -> str:
        return os.path.join(self.output_dir, f"{index}-{self.stages[index].name}")

    def _plan(self) -> list[dict]:
        return json.loads(json.dumps([{"name": s.name, "strategy": s.strategy.config(), "train": asdict(s.config)}
                                      for s in self.stages]))

    def _check_plan(self, finished: int) -> None:
        """output_dir's stages.json must list these stages and strategies, and the `finished` first stages'
        TrainConfigs must not differ in a way that changes their result."""
        path, plan = os.path.join(self.output_dir, PLAN), self._plan()
        if os.path.isfile(path):
            saved = read_json(path, "MultiStage", list)
            outline = [[entry.get(key) for key in ("name", "strategy")] if isinstance(entry, dict) else entry
                       for entry in saved]
            if outline != [[entry["name"], entry["strategy"]] for entry in plan]:
                raise ValueError(f"MultiStage: {self.output_dir} holds a run with other stages ({saved}); "
                                 "use another output_dir or delete it")
            for index in range(finished):
                changes = result_changes(saved[index]["train"], plan[index]["train"]) if "train" in saved[index] \
                    else []
                if changes:
                    raise ValueError(f"MultiStage: stage {index} {self.stages[index].name!r} finished under another "
                                     f"TrainConfig (differing in {changes}; stages.json in {self.output_dir}); a "
                                     f"finished stage is not trained again: delete {self.stage_dir(index)} to train "
                                     "it again, or use another output_dir")
        self._write_plan()

    def _write_plan(self) -> None:
        if is_main_process():
            path = os.path.join(self.output_dir, PLAN)
            os.makedirs(self.output_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(self._plan(), f, indent=1)
            os.replace(path + ".tmp", path)
        barrier()

    def run(self, model: nn.Module, resume: bool = True, change_config: bool = False) -> nn.Module:
        """Train every stage in order (resuming a stopped run when resume) and return the final model.
        change_config: let the stage in progress continue under a changed TrainConfig (Trainer.fit)."""
        if self.stages[0].config.distributed is not None:  # join first, so that rank 0 alone writes stages.json
            init_distributed(torch.device(self.stages[0].config.device))
        done = 0
        while resume and done < len(self.stages) and os.path.isfile(os.path.join(self.stage_dir(done), FINAL)):
            done += 1
        self._check_plan(done)
        for index in range(done):  # structure only: the weights come from the last finished stage's file
            stage = self.stages[index]
            torch.manual_seed(stage.config.seed)
            model = stage.strategy.finish(stage.strategy.prepare(model)).to(stage.config.device)
        if done:
            load_state(model, os.path.join(self.stage_dir(done - 1), FINAL), f"MultiStage stage {done - 1}")
        for index in range(done, len(self.stages)):
            stage = self.stages[index]
            trainer = Trainer(model, stage.strategy, stage.train_data, stage.eval_data, stage.config,
                              self.stage_dir(index), self.loss_fn)
            model = stage.strategy.finish(trainer.fit(resume=resume, change_config=change_config))
            self.results.append({"stage": stage.name, "trainable_parameters": trainer.trainable_parameters,
                                 **(trainer.history[-1] if trainer.history else {})})
            path = os.path.join(self.stage_dir(index), FINAL)
            if is_main_process():
                save_state(model.state_dict(), path + ".tmp")
                os.replace(path + ".tmp", path)
            barrier()
        return model
