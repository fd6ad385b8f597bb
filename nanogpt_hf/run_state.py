"""
What a training run carries from one iteration to the next and from one session to the next: RunState, saved whole
as every checkpoint's trainer_state.json, and load_run_state, which starts one fresh or takes it from the newest
checkpoint that verifies (--init_from resume), checked against this run's settings (guards.check_resumable).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from . import guards
from .lora import base_source


@dataclass
class RunState:
    """What a checkpoint's trainer_state.json holds and a resumed run continues from. The field names are its JSON
    keys, in their order; a checkpoint of an older version may lack the last three (they take their defaults)."""
    iter: int = 0  # iterations done
    best_val_loss: float = math.inf  # the best model's val loss (the untrained model's after iter 0's evaluation)
    history: list = field(default_factory=list)  # {iter, train_loss, val_loss} of every evaluation
    tokens_seen: int = 0  # training tokens, all ranks together
    train_time_s: float = 0.0  # seconds in iterations (evaluation and saving left out), all sessions of the run
    wall_time_s: float = 0.0  # seconds since the run started, all sessions together
    config: dict = field(default_factory=dict)  # the TrainConfig (guards.check_resumable compares the architecture)
    data_vocab_size: int = 0  # the data's vocab size
    world_size: int = 1  # processes (each saved its rng_state_<rank>.pt)
    results: dict = field(default_factory=dict)  # the best model's numbers (out_dir/results.json)
    skipped_updates: int = 0  # updates skipped for a non-finite loss (--nan_policy skip)
    tokenizer_hash: str | None = None  # guards.tokenizer_hash of the data's tokenizer
    lora_base: str | None = None  # --lora_r: the model the adapters sit on (checkpoints hold only the adapters)
    run_id: str | None = None  # out_dir's run (guards.RUN_MARKER): checkpoint.save prunes only this run's checkpoints
    resumes: list = field(default_factory=list)  # {iter, changes: {setting: [old, new]}}: resumes that changed any

    def to_dict(self):
        return dataclasses.asdict(self)

    def add_evaluation(self, losses):
        """Record this iteration's {"train": loss, "val": loss}; True if the val loss is a new best. At iter 0 it only
        sets the bar: the untrained model's val loss, which a best model must beat."""
        self.history.append({"iter": self.iter, "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.best_val_loss and self.iter > 0
        if improved or self.iter == 0:
            self.best_val_loss = losses["val"]
        return improved

    @classmethod
    def from_dict(cls, saved, **now):
        """A checkpoint's trainer_state.json -> RunState, with the fields in `now` (this run's config, vocab size,
        world size, tokenizer hash) replacing the saved ones; keys this version doesn't know are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in saved.items() if k in names}, **now})


def load_run_state(cfg, accelerator, data, tokenizer, log=print):
    """(RunState, checkpoint folder): a fresh state, or for --init_from resume the newest checkpoint that verifies,
    if it fits this run (guards.check_resumable); the config, vocab size, world size and tokenizer hash are this
    run's either way. Call it holding out_dir's lock: what a killed run left half-written goes first."""
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        ckpt.remove_unfinished_writes(out_dir)
    now = dict(config=cfg.to_dict(), data_vocab_size=data.vocab_size, world_size=accelerator.num_processes,
               tokenizer_hash=guards.tokenizer_hash(tokenizer), run_id=guards.run_id(out_dir))
    state, ckpt_dir = RunState(**now), None
    if cfg.init_from == "resume":
        ckpt_dir, saved = ckpt.load_latest(out_dir / "checkpoints", log=log)
        if ckpt_dir is None:
            raise ValueError(f"--init_from resume: no complete checkpoint in {out_dir / 'checkpoints'}; start the run "
                             "with --init_from scratch (or a pretrained model)")
        guards.check_resumable(saved, cfg, data, ckpt_dir, now["tokenizer_hash"])
        state = RunState.from_dict(saved, **now)
        log(f"resuming training from {ckpt_dir} (iter {state.iter})")
        changes = guards.resume_changes(saved["config"], cfg, saved.get("world_size", 1), accelerator.num_processes)
        if changes:  # allowed, but never silent: printed, and kept in every later checkpoint's history
            log("resume changes: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
            state.resumes.append({"iter": state.iter, "changes": changes})
    if cfg.lora_r:  # what the adapters sit on: where the run started (LoRA checkpoints hold only the adapters)
        state.lora_base = state.lora_base or base_source(cfg)
    return state, ckpt_dir
