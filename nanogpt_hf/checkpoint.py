"""
Resumable checkpoints: written so that a crash or a full disk never leaves half of one, verified when read.

    out_dir/checkpoints/step_XXXXXX/
        model.safetensors config.json   the weights (with the model config loading.build_model reads)
        optimizer.pt scaler.pt          the optimizer (or sharded/: FSDP / DeepSpeed in their own formats), fp16 scaler
        rng_state_<rank>.pt             each rank's RNG (dropout), so a resume is bit-exact
        trainer_state.json              iter, history, best val loss, the run's config, the tokenizer's hash
        manifest.json                   every file's size and sha256, written last

    from nanogpt_hf import checkpoint
    path = checkpoint.save(accelerator, model, optimizer, out_dir, state, keep=2)   # on every rank
    ckpt_dir, state = checkpoint.load_latest(out_dir / "checkpoints", log=print)    # newest that verifies
    checkpoint.load(accelerator, optimizer, ckpt_dir)                               # optimizer, scaler, RNG

A checkpoint is written into step_XXXXXX.tmp and renamed, so a step_XXXXXX folder is complete unless something
damaged it later; its manifest catches that (a truncated or emptied file, a flipped byte), and load_latest then
warns in one line and takes the next older one. sha256 of a GPT-2 small checkpoint (0.5 GB weights + 1 GB AdamW
state) takes ~1.4 s here (hashlib, ~1.1 GB/s), once per save and once per resume.

The run guards around a checkpoint (the out_dir lock, stop signals, disk room, resumability) are in guards.py.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from .guards import agree, checkpoints, write_error

CHECKPOINT_SLEEP_ENV = "NANOGPT_HF_CHECKPOINT_SLEEP"  # test hook "ITER:SECONDS": pause in iter ITER's checkpoint write
MANIFEST = "manifest.json"


class CheckpointWriteError(ValueError):
    """Saving failed (a full disk, a read-only file system); the message is one line naming the path and cause."""


def full_state_dict(accelerator, model):
    """All the weights, named as in the plain model. Call it on every rank: FSDP and DeepSpeed gather them here.
    (torch.compile's wrapper holds the model as `_orig_mod`, which would prefix every name.)"""
    state_dict = accelerator.get_state_dict(model)
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()} if state_dict is not None else None


# -----------------------------------------------------------------------------
# writing files so that a failed write says why


class _Sink:
    """torch.save's zip writer turns a failed write into 'unexpected pos': keep the OSError it hides."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def torch_save(obj, path):
    """torch.save(obj, path), but a full disk raises OSError ('No space left on device'), not a RuntimeError."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


@contextlib.contextmanager
def saving(folder, errors):
    """Collect an OSError (or safetensors' I/O error) raised while writing into folder as a one-line message in
    the list errors, and remove the half-written folder."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        path = getattr(e, "filename", None) or folder
        errors.append(f"could not write {path}: {write_error(e)}")
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def quiet_progress():
    """No 'Writing model shards' / 'Loading weights' progress bars from transformers in the middle of our log."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def file_mode():
    """The mode a new file gets under this process's umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(folder):
    """Every file below folder gets the umask's mode (safetensors writes 0600); folders keep theirs."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


# -----------------------------------------------------------------------------
# RNG state: each rank's dropout stream


def rng_state():
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_gauss, np_cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# the manifest: sizes and checksums, written last


def sha256(path):
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while chunk := f.read(1 << 24):
            h.update(chunk)
        return h.hexdigest()


def write_manifest(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": 1, "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                                          "sha256": sha256(p)} for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify(folder):
    """None if folder's files match its manifest, else what is wrong (one phrase). A checkpoint from before
    manifests (nanogpt_hf <= 0.1) is taken as it is."""
    path = folder / MANIFEST
    if not path.is_file():
        return None if (folder / "trainer_state.json").is_file() else f"{MANIFEST} missing"
    try:
        files = json.loads(path.read_text())["files"]
        files.items()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path} is damaged ({type(e).__name__})"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{p} is {size} bytes, the manifest says {want['size']}"
        if sha256(p) != want["sha256"]:
            return f"{p} does not match its sha256 in the manifest"
    return None


# -----------------------------------------------------------------------------
# finding, saving and loading checkpoints


def find_checkpoint(ckpt_root):
    """The newest checkpoint that has a manifest (or, from before manifests, a trainer_state.json), or None.
    Unverified: load_latest checks the files."""
    return next((p for p in checkpoints(ckpt_root) if (p / MANIFEST).is_file()
                 or (p / "trainer_state.json").is_file()), None)


def read_state(folder):
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
        state["iter"], state["config"]
        return state
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def run_of(folder):
    """The run_id a checkpoint was written by (None: from before run ids, or unreadable)."""
    try:
        return json.loads((folder / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def load_latest(ckpt_root, log=print):
    """(folder, trainer state) of the newest checkpoint whose files match its manifest, or (None, None). Each
    damaged one on the way is reported in one line via log."""
    for folder in checkpoints(ckpt_root):
        problem = verify(folder)
        if problem is None:
            try:
                return folder, read_state(folder)
            except ValueError as e:
                problem = str(e)
        log(f"warning: checkpoint {folder} is damaged ({problem}); trying the next older one")
    return None, None


def save(accelerator, model, optimizer, out_dir, state, keep=2, state_dict=None):
    """Everything needed to continue exactly -> out_dir/checkpoints/step_XXXXXX (state["iter"]); call on every rank.
    Written to a .tmp folder, manifest last, then renamed; the newest `keep` are kept. state_dict: the weights to
    save (default: all of them, gathered). A failed write raises CheckpointWriteError on every rank, and the
    checkpoints written before stay as they were."""
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{state['iter']:06d}", root / f"step_{state['iter']:06d}.tmp"
    if state_dict is None:
        state_dict = full_state_dict(accelerator, model)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    errors, main = [], accelerator.is_main_process
    if main:
        with saving(tmp, errors):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded:
        accelerator.save_state(tmp / "sharded")  # sharded optimizer states (a collective: not inside `saving`)
    if not (main and errors):
        with saving(tmp, errors):
            torch_save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")  # each rank's dropout stream
            if main:
                with quiet_progress():
                    accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp,
                                                                                              state_dict=state_dict)
                if os.environ.get(CHECKPOINT_SLEEP_ENV, "").startswith(f"{state['iter']}:"):  # tests: mid-write
                    time.sleep(float(os.environ[CHECKPOINT_SLEEP_ENV].split(":")[1]))
                if not sharded:
                    torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
                if accelerator.scaler is not None:
                    torch_save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if main and not errors:
        with saving(tmp, errors):
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            apply_umask(tmp)
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)  # only there if this step was saved before
            os.rename(tmp, final)  # atomic: from now on the checkpoint exists, and it is complete
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = find_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was written before"
        errors[0] += f"; {kept}. Free space (or fix the permissions), then resume with --init_from resume"
    agree(accelerator, errors[0] if errors else None, CheckpointWriteError)
    if main:
        for old in checkpoints(root)[keep:]:  # prune: keep the newest `keep`, and only ever this run's
            if run_of(old) in (None, state.get("run_id")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, optimizer, ckpt_dir):
    """Optimizer, grad scaler and this rank's RNG from ckpt_dir (the weights go in with the model).
    Everything is read with weights_only=True: tensors and plain containers, no pickled code."""
    if (ckpt_dir / "sharded").is_dir():
        accelerator.load_state(ckpt_dir / "sharded")
    else:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (ckpt_dir / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(ckpt_dir / "scaler.pt", weights_only=True))
    rng_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # more processes than when it was saved: a new dropout stream, so not bit-exact from here on
        print(f"[rank {accelerator.process_index}] {rng_file.name} not in the checkpoint; dropout RNG reseeded")


def remove_unfinished_writes(out_dir):
    """Leftovers of a run killed while saving: the .tmp folders never became a checkpoint or the model."""
    shutil.rmtree(out_dir / ".tmp_best", ignore_errors=True)
    for tmp in (out_dir / "checkpoints").glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def describe_newest(out_dir):
    """What a user can resume from, in words, for error messages."""
    newest = find_checkpoint(Path(out_dir) / "checkpoints")
    if newest is None:
        return f"no checkpoint has been written to {Path(out_dir) / 'checkpoints'} yet"
    return f"the newest checkpoint is {newest}: resume from it with --init_from resume"


@contextlib.contextmanager
def resume_hint(out_dir):
    """A run that diverged (a FloatingPointError) says in its one line what there is to resume from."""
    try:
        yield
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; {describe_newest(out_dir)}") from None


__all__ = ["save", "load", "load_latest", "find_checkpoint", "checkpoints", "verify", "write_manifest", "read_state",
           "remove_unfinished_writes", "CheckpointWriteError", "CHECKPOINT_SLEEP_ENV", "MANIFEST", "full_state_dict",
           "rng_state", "set_rng_state", "torch_save", "saving", "quiet_progress", "file_mode", "apply_umask",
           "describe_newest", "resume_hint"]

