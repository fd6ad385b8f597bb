"""
Resumable checkpoints, and what keeps a run's out_dir safe: interrupts, damaged files, a second run, a full disk.

    out_dir/checkpoints/step_XXXXXX/
        model.safetensors config.json   the weights (with the model config build_model reads)
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

Also here: OutDirLock (one run per out_dir), check_room (pre-flight: out_dir writable and room for a
checkpoint), StopSignals (SIGINT / SIGTERM / SIGUSR1 -> finish the iteration, checkpoint, exit 128 + signal).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

CHECKPOINT_SLEEP_ENV = "NANOGPT_HF_CHECKPOINT_SLEEP"  # test hook "ITER:SECONDS": pause in iter ITER's checkpoint write
MANIFEST = "manifest.json"
STEP = re.compile(r"step_\d+")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {int(s): 128 + int(s) for s in STOP_SIGNALS}  # 130 SIGINT, 143 SIGTERM, 138 SIGUSR1 (Linux numbers)


class CheckpointWriteError(ValueError):
    """Saving failed (a full disk, a read-only file system); the message is one line naming the path and cause."""


class Interrupted(Exception):
    """A stop signal ended the run after a checkpoint; exit_code is 128 + the signal's number."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


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


def write_error(e):
    """The cause of a failed write in a few words: 'No space left on device', 'Permission denied', ..."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)  # safetensors: "...: I/O error: No space ..."
    return m.group(1) if m else text


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


def checkpoints(root):
    """The step_XXXXXX folders in root (finished writes, damaged or not), newest first."""
    found = [p for p in Path(root).glob("step_*") if STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


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
        for old in checkpoints(root)[keep:]:  # prune: keep the newest `keep`
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


__all__ = ["save", "load", "load_latest", "find_checkpoint", "checkpoints", "verify", "write_manifest",
           "remove_unfinished_writes", "OutDirLock", "check_room", "StopSignals", "Interrupted",
           "CheckpointWriteError", "EXIT_CODES", "CHECKPOINT_SLEEP_ENV", "full_state_dict", "rng_state",
           "set_rng_state", "torch_save", "agree", "file_mode", "apply_umask", "describe_newest"]


# -----------------------------------------------------------------------------
# the tokenizer's identity: the same vocab size is not the same vocab


def tokenizer_hash(tokenizer):
    """A short hash of a tokenizer's vocabulary (token -> id), or None without a tokenizer."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_tokenizer(model_dir, tokenizer, flag, data_dir):
    """A local model dir with a tokenizer (a train.py out_dir) must have the data's tokenizer; ValueError naming
    both otherwise. Hub ids and folders without one are not checked (nothing to compare without a download)."""
    folder = Path(os.path.expanduser(str(model_dir)))
    if tokenizer is None or not folder.is_dir() or not any((folder / n).is_file() for n in
                                                          ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return
    a, b = tokenizer_hash(theirs), tokenizer_hash(tokenizer)
    if a != b:
        raise ValueError(f"{flag}: its tokenizer ({len(theirs)} tokens, vocab hash {a}) is not the data's "
                         f"({len(tokenizer)} tokens, vocab hash {b}, {data_dir}): the token ids would mean other "
                         "text; prepare the data with the model's tokenizer")
