"""
Run guards: what keeps a training run and its out_dir safe, checked before the work they protect.

    with StopSignals() as stop, OutDirLock(out_dir) as lock:   # what train() does around the whole run
        error = claim_out_dir(out_dir, lock)                    # main process: mkdir + the lock (one run per out_dir)
        agree(accelerator, error)                               # every rank raises if any rank failed
        ...
        if stop.agreed(accelerator): ...                        # SIGINT / SIGTERM / SIGUSR1 reached some rank

    check_launch(accelerator, cfg)    the processes Accelerate set up are the ones that were launched
    check_push(cfg)                   --push_to_hub has a Hub token (before training, not after it)
    check_room(out_dir, num_params)   out_dir is writable and has room for a checkpoint and the best model
    check_resumable(state, cfg, ...)  a checkpoint resumes only into the same model, optimizer and vocab
    check_same_tokenizer(...)         a pretrained model dir's tokenizer is the data's
    check_skipped(skipped, it, cfg)   --nan_policy skip gives up when too many updates were skipped

Every check fails with one line that names the flag or file and says what to do. This module sits below
checkpoint.py (which uses agree and write_error) and knows nothing about the checkpoint format.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from huggingface_hub import get_token
from transformers import AutoTokenizer

from .chat import extends
from .cli import Interrupted
from .data_format import tokenizer_hash
from .train_config import ARCHITECTURE, TrainConfig

# SIGHUP: the terminal closed or the ssh connection dropped; SIGUSR2: what some schedulers send instead of USR1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2)
EXIT_CODES = {int(s): 128 + int(s) for s in STOP_SIGNALS}  # 130 INT, 143 TERM, 138 USR1, 129 HUP, 140 USR2 (Linux)
RUN_MARKER = ".nanogpt_hf_run.json"  # in out_dir: this folder holds our run (its id), so we may write and prune


# -----------------------------------------------------------------------------
# agreeing across ranks: an error on one rank must not leave the others waiting in a collective


def agree(accelerator, error, exc=ValueError):
    """Call on every rank with this rank's error message (or None): raises exc on every rank if any has one (a
    rank without one of its own says so; the failing rank's line names the cause)."""
    if accelerator.num_processes > 1:
        failed = torch.tensor(float(error is not None), device=accelerator.device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item() and error is None:
            error = f"[rank {accelerator.process_index}] stopped because another rank failed (its error names why)"
    if error:
        raise exc(error)


def write_error(e):
    """The cause of a failed write in a few words: 'No space left on device', 'Permission denied', ..."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)  # safetensors: "...: I/O error: No space ..."
    return m.group(1) if m else text


def first_line(e):
    """An exception as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Validation error for ...:" and the cause on the next line
        lines[0] = f"{lines[0]} {lines[1]}"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# -----------------------------------------------------------------------------
# the launch and the Hub: wrong before anything is trained


def check_launch(accelerator, cfg):
    """What `accelerate launch --config_file` / torchrun asked for must be what Accelerate set up, and work with
    cfg's optimizer."""
    launched, world = int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes
    # what `accelerate launch --config_file` asked for (it exports these to every process)
    wants = next((kind for kind in ("FSDP", "DEEPSPEED")
                  if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() in ("1", "true")), None)
    if launched != world or (wants and accelerator.distributed_type.name != wants):
        # e.g. `accelerate launch --config_file accelerate_configs/fsdp.yaml` without GPUs: accelerate >= 1.13 sets
        # each of the N processes up alone (all N would train the same thing and write the same out_dir); older
        # ones run plain CPU DDP, silently without FSDP
        raise ValueError(f"launched as {launched} processes{' with ' + wants if wants else ''} but Accelerate set up "
                         f"{world} ({accelerator.distributed_type.value}): FSDP, DeepSpeed and multi-GPU configs need "
                         "GPUs; on CPU use --config_file accelerate_configs/cpu.yaml or torchrun")
    if cfg.optimizer == "muon" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("--optimizer muon does not work with DeepSpeed, whose ZeRO hands the optimizer flat 1-D "
                         "partitions instead of the weight matrices that Muon orthogonalizes: use DDP (multi_gpu.yaml)")


def check_push(cfg):
    """--push_to_hub needs a token. Call on every rank: an error on one rank alone would leave the others waiting."""
    if cfg.push_to_hub and not get_token():
        raise ValueError("--push_to_hub: not logged in to the Hub; run `hf auth login` or set HF_TOKEN")


# -----------------------------------------------------------------------------
# out_dir: one run at a time, and room for a checkpoint


class OutDirLock:
    """An exclusive flock on out_dir/.lock, held by the main process while it trains. The kernel drops it when
    the process ends, however it ends (kill -9 too), so a stale lock never blocks a later run. The file holds
    the PID and host of the run that has it (shared file systems: flock works on NFSv4 and Lustre)."""

    def __init__(self, out_dir):
        self.path, self.fd = Path(out_dir) / ".lock", None

    def acquire(self):
        """None on success, else the one-line reason (another run has it, or out_dir is not writable)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            return f"--out_dir {self.path.parent} is not writable ({write_error(e)}): {self.path}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            return (f"--out_dir {self.path.parent} is in use by another training run (PID {pid} on {host}); wait "
                    "for it to end or stop it, or use another --out_dir")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        return None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race a new run)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_out_dir(out_dir, lock, cfg=None):
    """Main process: create out_dir, take its lock and (cfg given) make sure it is ours (check_owner). None, or the
    one-line reason why not."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out_dir {out_dir}: cannot create it ({write_error(e)})"
    return lock.acquire() or (check_owner(out_dir, cfg) if cfg is not None else None)


def run_id(out_dir):
    """The id of the run out_dir holds (its RUN_MARKER), or None."""
    try:
        return json.loads((Path(out_dir) / RUN_MARKER).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_owner(out_dir, cfg):
    """Never write into what isn't ours. out_dir must be empty, or hold a run of ours (RUN_MARKER; or, from before
    markers, a train_config.json or checkpoints/): a new run into one that holds checkpoints is refused unless
    --init_from resume (continue it) or --overwrite (its checkpoints go). A fresh run writes a new marker, so the
    run's checkpoints are told from any other's. None, or the one-line reason."""
    out_dir = Path(out_dir)
    present = {p.name for p in out_dir.iterdir()} - {".lock", RUN_MARKER}
    ours = run_id(out_dir) is not None or bool({"train_config.json", "checkpoints"} & present)
    if present and not ours:
        shown = ", ".join(sorted(present)[:3]) + (", ..." if len(present) > 3 else "")
        return (f"--out_dir {out_dir} is not empty and holds no nanogpt_hf run ({shown}): training would overwrite "
                "those files; use a new or empty folder")
    old = checkpoints(out_dir / "checkpoints")
    if cfg.init_from == "resume" or cfg.eval_only:
        if run_id(out_dir) is None and cfg.init_from == "resume":  # a run from before markers: adopt it
            _write_marker(out_dir)
        return None
    if old and not cfg.overwrite:
        return (f"--out_dir {out_dir} holds another run's checkpoints ({old[0].name}, ...): continue it with "
                "--init_from resume, replace it with --overwrite, or use another --out_dir")
    for folder in old:  # --overwrite: the old run's checkpoints go (they would be pruned or resumed by mistake)
        shutil.rmtree(folder, ignore_errors=True)
    _write_marker(out_dir)
    return None


STEP = re.compile(r"step_\d+")  # a finished checkpoint folder (a write in progress is step_N.tmp)


def checkpoints(root):
    """The step_XXXXXX folders in root (finished writes, damaged or not), newest first. Here, below checkpoint.py,
    because check_owner counts another run's checkpoints too."""
    found = [p for p in Path(root).glob("step_*") if STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _write_marker(out_dir):
    (Path(out_dir) / RUN_MARKER).write_text(json.dumps({"run_id": uuid.uuid4().hex, "started": time.time()}) + "\n")


def checkpoint_bytes(num_params):
    """About what one checkpoint takes on disk: fp32 weights plus the optimizer's state (AdamW: two fp32 moments
    per weight; Muon: at most that, so one bound serves both), plus 5% and 1 MB for the rest."""
    return int(num_params * 4 * 3 * 1.05) + (1 << 20)


def check_room(out_dir, num_params):
    """None, or a one-line reason why out_dir can't take a checkpoint and a best model: not writable, or too
    little free space."""
    folder = Path(out_dir) / "checkpoints"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test_{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        return f"--out_dir {out_dir} is not writable ({write_error(e)}: {getattr(e, 'filename', None) or folder})"
    need = checkpoint_bytes(num_params) + num_params * 4  # a checkpoint, and the best model
    free = shutil.disk_usage(folder).free
    if free < need:
        return (f"--out_dir {out_dir} has {free / 2**20:.1f} MB free, but a checkpoint and the best model of this "
                f"{num_params:,}-parameter model need about {need / 2**20:.1f} MB: free space or use another "
                "--out_dir")
    return None


# -----------------------------------------------------------------------------
# stop signals


class StopSignals:
    """While active, SIGINT (Ctrl-C), SIGTERM (schedulers, docker stop) and SIGUSR1 (SLURM's --signal) only set
    a flag; the trainer checks it once per iteration (and per evaluation batch), agreeing across ranks, then
    writes a checkpoint and raises Interrupted with exit code 128 + signal. A second Ctrl-C stops at once,
    without a checkpoint. Handlers are installed only in the main thread, and restored on exit."""

    def __init__(self):
        self.signum, self._old, self._first = None, {}, 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self._first = signum, time.time()
            print(f"{signal.Signals(signum).name}: stopping after this iteration, writing a checkpoint"
                  + (" (Ctrl-C again: stop at once, without one)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and time.time() - self._first > 1:
            raise Interrupted("second Ctrl-C: stopped at once, without writing a checkpoint",
                              EXIT_CODES[signal.SIGINT])

    @property
    def requested(self):
        return self.signum is not None

    def agreed(self, accelerator, *flags):
        """Whether any rank got a stop signal (then it counts as received here too), and for each of flags (bools
        or 0-d tensors) whether it is true on any rank: one all-reduce when distributed (call on every rank)."""
        if accelerator.num_processes > 1:
            values = torch.stack([torch.as_tensor(float(self.signum or 0), device=accelerator.device)]
                                 + [torch.as_tensor(f, device=accelerator.device).float() for f in flags])
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
            signum, *flags = values.tolist()
            if signum and self.signum is None:
                self.signum = int(signum)  # another rank's signal: stop with it
            # the reduced value, not self.requested: a signal landing here, after the all-reduce, would make this
            # rank stop an iteration before the others (which then hang in their next collective); it counts at
            # the next call instead
            stopping, flags = signum > 0, [f > 0 for f in flags]
        else:
            stopping = self.requested
        return (stopping, *flags) if flags else stopping

    def interrupted(self, path, it):
        """The Interrupted to raise after the checkpoint path (None: there is none, nothing was trained yet)."""
        name, code = signal.Signals(self.signum).name, EXIT_CODES[self.signum]
        where = f"checkpoint {path}; continue with --init_from resume" if path else "nothing trained, no checkpoint"
        return Interrupted(f"stopped by {name} at iter {it}; {where} (exit code {code})", code)


# -----------------------------------------------------------------------------
# the tokenizer's identity: the same vocab size is not the same vocab


def check_same_tokenizer(model_dir, tokenizer, flag, data_dir):
    """A local model dir with a tokenizer (a train.py out_dir) must have the data's tokenizer; ValueError naming
    both otherwise. Hub ids and folders without one are not checked (nothing to compare without a download)."""
    folder = Path(os.path.expanduser(str(model_dir)))
    if tokenizer is None or not folder.is_dir() or not any((folder / n).is_file() for n in
                                                          ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return
    try:
        theirs = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return
    a, b = tokenizer_hash(theirs), tokenizer_hash(tokenizer)
    if a != b and not extends(theirs, tokenizer):  # (SFT data: the model's tokenizer + the chat tokens is fine)
        raise ValueError(f"{flag}: its tokenizer ({len(theirs)} tokens, vocab hash {a}) is not the data's "
                         f"({len(tokenizer)} tokens, vocab hash {b}, {data_dir}): the token ids would mean other "
                         "text; prepare the data with the model's tokenizer")


# -----------------------------------------------------------------------------
# resuming, and giving up on a diverging run


def check_resumable(state, cfg, data, ckpt_dir, tokenizer_hash=None):
    """Refuse to resume into a different model: the architecture, the optimizer and the data's vocab (its size and,
    where both are known, its tokenizer's hash) must match. state: the checkpoint's trainer_state.json."""
    saved = state["config"]
    saved = {k: saved.get(k, getattr(TrainConfig, k)) for k in ARCHITECTURE}  # keys newer than the checkpoint: default
    diffs = [f"{k} {saved[k]!r} (checkpoint) vs {getattr(cfg, k)!r} (now)" for k in ARCHITECTURE
             if saved[k] != getattr(cfg, k)]
    # a checkpoint's optimizer state loads only into the same optimizer (checkpoints from before Muon: AdamW)
    if state["config"].get("optimizer", "adamw") != cfg.optimizer:
        diffs.append(f"optimizer {state['config'].get('optimizer', 'adamw')!r} (checkpoint) vs {cfg.optimizer!r} (now)")
    if state["data_vocab_size"] != data.vocab_size:
        diffs.append(f"the data's vocab_size {state['data_vocab_size']} (checkpoint) vs {data.vocab_size} "
                     f"(now, {cfg.data_dir})")
    elif None not in (state.get("tokenizer_hash"), tokenizer_hash) and state["tokenizer_hash"] != tokenizer_hash:
        diffs.append(f"the tokenizer: vocab hash {state['tokenizer_hash']} (checkpoint) vs {tokenizer_hash} (now, "
                     f"{cfg.data_dir}): same size, different tokens")
    if diffs:
        raise ValueError(f"cannot resume from {ckpt_dir}: " + "; ".join(diffs) + ". Resume with the "
                         "checkpoint's settings, or start a new run in another --out_dir")


# what a resumed run may change (the rest must match: check_resumable); a change is printed and recorded
RESUME_VISIBLE = ("batch_size", "gradient_accumulation_steps", "seed", "learning_rate", "min_lr", "warmup_iters",
                  "lr_decay_iters", "max_iters", "decay_lr", "batch_size_warmup_iters", "batch_size_warmup_start",
                  "weight_decay", "grad_clip", "muon_learning_rate", "dropout", "nan_policy", "mixed_precision")


def resume_changes(saved, cfg, saved_world, world):
    """{setting: [checkpoint's, now]} of what this resume changes among RESUME_VISIBLE and the process count."""
    changes = {k: [saved[k], getattr(cfg, k)] for k in RESUME_VISIBLE if k in saved and saved[k] != getattr(cfg, k)}
    if saved_world != world:
        changes["processes"] = [saved_world, world]
    return changes


def check_skipped(skipped, it, cfg):
    """--nan_policy skip: stop when more than max_skipped_share of the updates so far were skipped. (The trainer
    adds to every FloatingPointError what there is to resume from.)"""
    if it and skipped > cfg.max_skipped_share * it:
        raise FloatingPointError(f"{skipped} of {it} updates were skipped for a non-finite loss (--nan_policy skip "
                                 f"allows --max_skipped_share {cfg.max_skipped_share}): the training diverges (lower "
                                 "--learning_rate)")


__all__ = ["agree", "write_error", "first_line", "check_launch", "check_push", "OutDirLock", "claim_out_dir",
           "check_owner", "run_id", "RUN_MARKER", "checkpoint_bytes", "check_room", "StopSignals", "Interrupted",
           "STOP_SIGNALS", "EXIT_CODES", "tokenizer_hash", "check_same_tokenizer", "check_resumable", "resume_changes",
           "RESUME_VISIBLE", "check_skipped", "checkpoints", "STEP"]
