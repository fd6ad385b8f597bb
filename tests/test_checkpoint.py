"""Checkpoints and what keeps out_dir safe, with real processes, real signals, a real full disk:

- the manifest catches a truncated/emptied/damaged file; resume warns in one line and takes the next older one;
- SIGINT / SIGUSR1 to examples/train.py: it finishes the iteration, writes a checkpoint, prints one line, exits
  130 / 138; the resumed run is bit-exact; SIGTERM to one rank of a 2-process torchrun: both ranks stop together;
- checkpoints at every eval and every checkpoint_interval: a kill -9 loses at most one interval;
- a second run on a busy out_dir refuses, naming the PID and host; the lock dies with the process;
- a full disk (a small tmpfs) and a read-only out_dir: one line naming path and cause, the previous checkpoint
  intact; the pre-flight check refuses a disk without room for a checkpoint;
- the best model's files get the umask's mode; a different tokenizer with the same vocab size is refused.

    python -m pytest tests/test_checkpoint.py -q
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from nanogpt_hf import checkpoint as ckpt
from nanogpt_hf import guards
from nanogpt_hf.trainer import RunState, train
from test_trainer import read_dump, tiny_args, tiny_cfg

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]



def reset():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def start(cfg, env=None, launcher=()):
    """examples/train.py with cfg in a real process (stdout+stderr captured together)."""
    cmd = [sys.executable, *launcher, str(ROOT / "examples/train.py"), *tiny_args(cfg)]
    return subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # a process group: a hung run is killed with its workers


def wait_for(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def dump_lines(path):
    return len(Path(path).read_text().splitlines()) if Path(path).is_file() else 0


def one_line_error(out):
    """The run's output ends in exactly one 'error: ...' line and holds no traceback."""
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


# -----------------------------------------------------------------------------
# the manifest: damaged checkpoints are found, resume falls back


@pytest.fixture(scope="module")
def two_checkpoints(char_data_dir, tmp_path_factory):
    """A run with checkpoints at iterations 4 and 8 (always_save_checkpoint false, as in the shipped CPU configs),
    trained under umask 022."""
    out = tmp_path_factory.mktemp("two") / "out"
    reset()
    old = os.umask(0o022)
    try:
        train(tiny_cfg(char_data_dir, out, always_save_checkpoint=False))
    finally:
        os.umask(old)
    reset()
    return out


def test_manifest_lists_every_file_and_best_model_has_umask_mode(two_checkpoints):
    names = [p.name for p in ckpt.checkpoints(two_checkpoints / "checkpoints")]
    assert names == ["step_000008", "step_000004"]  # newest first; written whatever val did
    newest = two_checkpoints / "checkpoints/step_000008"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pt", "trainer_state.json", "config.json"} <= set(manifest)
    assert manifest["optimizer.pt"]["size"] == (newest / "optimizer.pt").stat().st_size
    assert ckpt.verify(newest) is None
    for name in ("model.safetensors", "config.json", "results.json", "tokenizer.json"):
        assert (two_checkpoints / name).stat().st_mode & 0o777 == 0o644, name  # safetensors alone: 0600 before
    assert (newest / "model.safetensors").stat().st_mode & 0o777 == 0o644


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "empty model.safetensors": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "truncated optimizer.pt": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:-10])),
    "a flipped byte in optimizer.pt": ("optimizer.pt", flip_a_byte),
    "damaged trainer_state.json": ("trainer_state.json", lambda p: p.write_text('{"iter": 8, "hist')),
    "missing rng_state_0.pt": ("rng_state_0.pt", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint(two_checkpoints, char_data_dir, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    name, spoil = DAMAGE[damage]
    spoil(out / "checkpoints/step_000008" / name)
    problem = ckpt.verify(out / "checkpoints/step_000008")
    assert problem and name in problem
    capsys.readouterr()
    results = train(tiny_cfg(char_data_dir, out, init_from="resume", always_save_checkpoint=False))
    log = capsys.readouterr().out
    warnings = [line for line in log.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "step_000008" in warnings[0] and name in warnings[0], log
    assert "resuming training from" in log and "step_000004 (iter 4)" in log
    assert results["final_iter"] == 8 and ckpt.verify(out / "checkpoints/step_000008") is None  # written anew


def test_all_checkpoints_damaged_is_one_line(two_checkpoints, char_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    for step in ckpt.checkpoints(out / "checkpoints"):
        (step / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        train(tiny_cfg(char_data_dir, out, init_from="resume"))
    assert capsys.readouterr().out.count("warning: checkpoint") == 2


# trainer_state.json as the trainer has written it since its first version (keys added later: the last three)
STATE_KEYS = ["iter", "best_val_loss", "history", "tokens_seen", "train_time_s", "wall_time_s", "config",
              "data_vocab_size", "world_size", "results", "skipped_updates", "tokenizer_hash", "lora_base", "run_id",
              "resumes"]  # run_id and resumes: issue 24 (out_dir ownership, visible resume changes)
OLDEST_KEYS = STATE_KEYS[:10]


def test_old_checkpoint_format_resumes_into_run_state(two_checkpoints, char_data_dir, tmp_path):
    """A checkpoint as the first trainer versions wrote it (no manifest; trainer_state.json without
    skipped_updates, tokenizer_hash, lora_base; a config without the keys added since) resumes with RunState and
    ends where the straight run ended; the new code writes the same keys, in the same order."""
    assert list(json.loads((two_checkpoints / "checkpoints/step_000008/trainer_state.json").read_text())) \
        == STATE_KEYS
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    shutil.rmtree(out / "checkpoints/step_000008")
    old = out / "checkpoints/step_000004"
    state = json.loads((old / "trainer_state.json").read_text())
    state = {k: state[k] for k in OLDEST_KEYS}
    for key in ("optimizer", "muon_learning_rate", "lora_r", "lora_alpha", "lora_target_modules",
                "position_embedding", "activation_function", "vocab_multiple", "nan_policy"):
        del state["config"][key]  # (their defaults, as the run had them)
    (old / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    (old / ckpt.MANIFEST).unlink()

    run = RunState.from_dict(state)
    assert (run.iter, run.skipped_updates, run.tokenizer_hash, run.lora_base) == (4, 0, None, None)
    assert run.history == state["history"] and list(run.to_dict()) == STATE_KEYS
    results = train(tiny_cfg(char_data_dir, out, init_from="resume", always_save_checkpoint=False))
    assert results["final_iter"] == 8
    resumed = json.loads((out / "checkpoints/step_000008/trainer_state.json").read_text())
    straight = json.loads((two_checkpoints / "checkpoints/step_000008/trainer_state.json").read_text())
    assert list(resumed) == STATE_KEYS and resumed["tokenizer_hash"] == straight["tokenizer_hash"]
    assert [h["iter"] for h in resumed["history"]] == [0, 4, 8]
    assert resumed["history"][:2] == straight["history"][:2] and resumed["tokens_seen"] == straight["tokens_seen"]
    a, b = (load_file(d / "checkpoints/step_000008/model.safetensors") for d in (out, two_checkpoints))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)


# -----------------------------------------------------------------------------
# stop signals: checkpoint, one line, exit code, bit-exact resume


LONG = dict(max_iters=100_000, eval_interval=100_000, lr_decay_iters=100, warmup_iters=2, dropout=0.1,
            log_interval=1000)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_signal_writes_a_checkpoint_and_resume_is_bit_exact(char_data_dir, tmp_path, sig, one_thread):
    """The run in a real process gets the signal; the resume and the straight run are in this one, on one thread
    as that process was (so that the floating-point sums are the same)."""
    out, dump = tmp_path / "out", tmp_path / "dump"
    proc = start(tiny_cfg(char_data_dir, out, debug_dump_dir=str(dump), **LONG))
    wait_for(lambda: dump_lines(dump / "rank0.jsonl") >= 3, proc, "3 iterations")
    os.kill(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGUSR1: 138}[sig], output[-3000:]
    assert "Traceback" not in output
    stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "--init_from resume" in stopped[0], output[-3000:]
    newest = ckpt.find_checkpoint(out / "checkpoints")
    it = int(newest.name[5:])
    assert newest.as_posix() in stopped[0] and f"at iter {it};" in stopped[0]
    assert dump_lines(dump / "rank0.jsonl") == it  # it finished the iteration it was in, and no more
    assert ckpt.verify(newest) is None

    # resume to it + 3 == a straight run to it + 3, bit for bit (dropout included)
    end = dict(LONG, max_iters=it + 3)
    train(tiny_cfg(char_data_dir, out, init_from="resume", debug_dump_dir=str(dump), **end))
    reset()
    train(tiny_cfg(char_data_dir, tmp_path / "straight", debug_dump_dir=str(tmp_path / "dump_s"), **end))
    resumed, straight = read_dump(dump / "rank0.jsonl"), read_dump(tmp_path / "dump_s/rank0.jsonl")
    assert [r["iter"] for r in resumed] == list(range(it + 3))
    assert [(r["loss"], r["weights"]) for r in resumed] == [(r["loss"], r["weights"]) for r in straight]


def children(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(int(v[5:]) for v in env if v.startswith(b"RANK="))


def test_sigterm_to_one_rank_stops_both_at_the_same_iteration(char_data_dir, tmp_path):
    """torchrun, 2 processes (gloo): SIGTERM reaches rank 1 only; the flag is all-reduced, so rank 0 stops at
    the same iteration, and the checkpoint holds both ranks' RNG (resuming is test_distributed's and the
    single-process test's business)."""
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cfg = tiny_cfg(char_data_dir, out, debug_dump_dir=str(out / "dump"), **LONG)
    proc = start(cfg, launcher=launcher)
    wait_for(lambda: dump_lines(out / "dump/rank1.jsonl") >= 3, proc, "3 iterations")
    rank1 = next(p for p in children(proc.pid) if rank_of(p) == 1)
    os.kill(rank1, signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers (which hold the output pipe too)
        raise AssertionError(f"the ranks did not stop: {proc.communicate()[0][-3000:]}") from None
    assert proc.returncode != 0  # torchrun reports the workers' exit code 143 as a failure
    assert "exitcode  : 143" in output or "exit code 143" in output, output[-3000:]
    newest = ckpt.find_checkpoint(out / "checkpoints")
    it = int(newest.name[5:])
    assert dump_lines(out / "dump/rank0.jsonl") == dump_lines(out / "dump/rank1.jsonl") == it  # the same iteration
    assert (newest / "rng_state_0.pt").is_file() and (newest / "rng_state_1.pt").is_file()
    assert ckpt.verify(newest) is None
    assert sum(line.startswith("stopped by SIGTERM") for line in output.splitlines()) == 1, output[-3000:]



# -----------------------------------------------------------------------------
# checkpoint_interval: a kill -9 loses at most one interval


def test_kill_9_loses_at_most_one_checkpoint_interval(char_data_dir, tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    proc = start(tiny_cfg(char_data_dir, out, debug_dump_dir=str(dump), checkpoint_interval=3, **LONG))
    wait_for(lambda: dump_lines(dump / "rank0.jsonl") >= 10, proc, "10 iterations")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = dump_lines(dump / "rank0.jsonl")  # iterations finished before the kill
    newest = ckpt.find_checkpoint(out / "checkpoints")
    assert newest is not None and done - 3 <= int(newest.name[5:]) <= done, (done, newest)
    assert ckpt.verify(newest) is None


def test_checkpoint_minutes(char_data_dir, tmp_path):
    out = tmp_path / "out"
    handlers = {s: signal.getsignal(s) for s in guards.STOP_SIGNALS}
    train(tiny_cfg(char_data_dir, out, max_iters=6, eval_interval=100, checkpoint_minutes=1e-6, keep_checkpoints=3))
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["step_000006", "step_000005", "step_000004"]
    assert {s: signal.getsignal(s) for s in guards.STOP_SIGNALS} == handlers  # train() put the handlers back


# -----------------------------------------------------------------------------
# one run per out_dir


def test_second_run_on_a_busy_out_dir_refuses_and_the_lock_dies_with_the_run(char_data_dir, tmp_path):
    out = tmp_path / "out"
    first = start(tiny_cfg(char_data_dir, out), env={ckpt.CHECKPOINT_SLEEP_ENV: "4:60"})  # holds out_dir 60 s
    try:
        wait_for(lambda: (out / "checkpoints/step_000004.tmp/model.safetensors").is_file(), first, "its checkpoint")
        with pytest.raises(ValueError) as e:  # this process is the second run
            train(tiny_cfg(char_data_dir, out))
        line = str(e.value)
        assert f"in use by another training run (PID {first.pid} on {socket.gethostname()})" in line, line
        reset()
        assert (out / "checkpoints/step_000004.tmp/model.safetensors").is_file()  # it left the first run's files
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    train(tiny_cfg(char_data_dir, out, max_iters=4))  # the kernel dropped the dead run's lock
    assert ckpt.find_checkpoint(out / "checkpoints").name == "step_000004"


# -----------------------------------------------------------------------------
# a full disk and a read-only out_dir: a real small tmpfs


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder):
    """Write until the file system is full: a real ENOSPC for whoever writes next."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(char_data_dir, tmpfs):
    out = tmpfs / "out"
    proc = start(tiny_cfg(char_data_dir, out), env={ckpt.CHECKPOINT_SLEEP_ENV: "8:2"})
    wait_for(lambda: (out / "checkpoints/step_000008.tmp/model.safetensors").is_file(), proc, "its checkpoint")
    fill(tmpfs)  # the disk fills up while iteration 8's checkpoint is being written
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    line = one_line_error(output)
    assert "step_000008.tmp" in line and "No space left on device" in line, line
    assert "step_000004 is intact" in line
    assert ckpt.verify(out / "checkpoints/step_000004") is None and not (out / "checkpoints/step_000008.tmp").exists()

    # the pre-flight check: no room for a checkpoint -> refused before any work
    t0 = time.time()
    with pytest.raises(ValueError, match=r"--out_dir .* has 0\.\d MB free, but a checkpoint and the best model"):
        train(tiny_cfg(char_data_dir, out, init_from="resume"))
    assert time.time() - t0 < 10
    (tmpfs / "filler").unlink()
    reset()
    assert train(tiny_cfg(char_data_dir, out, init_from="resume"))["final_iter"] == 8


def test_read_only_out_dir_is_refused_at_start(char_data_dir, tmpfs):
    out = tmpfs / "out"
    train(tiny_cfg(char_data_dir, out, max_iters=4))
    reset()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    t0 = time.time()
    with pytest.raises(ValueError, match=rf"--out_dir {out} is not writable \(Read-only file system\)"):
        train(tiny_cfg(char_data_dir, out, init_from="resume", max_iters=8))
    assert time.time() - t0 < 10  # refused before any work


# -----------------------------------------------------------------------------
# the tokenizer's identity


@pytest.fixture(scope="module")
def other_chars_data_dir(char_data_dir, tmp_path_factory):
    """The same text with one character replaced by another: the same vocab size, other tokens."""
    from nanogpt_hf.prepare import prepare_dataset

    from conftest import make_text

    root = tmp_path_factory.mktemp("other_chars")
    text = make_text(40_000, seed=1)
    assert "@" not in text
    (root / "input.txt").write_text(text.replace("q", "@"), encoding="utf-8")
    prepare_dataset("other_char", data_dir=root / "d", inputs=[str(root / "input.txt")], tokenizer="char",
                    shard_size=4096)
    assert json.loads((root / "d/meta.json").read_text())["vocab_size"] == \
        json.loads((char_data_dir / "meta.json").read_text())["vocab_size"]
    return root / "d"


def test_other_tokenizer_with_the_same_vocab_size_is_refused(two_checkpoints, other_chars_data_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    with pytest.raises(ValueError, match=r"cannot resume from .*step_000008: the tokenizer: vocab hash \w+ "
                                         r"\(checkpoint\) vs \w+ \(now"):
        train(tiny_cfg(other_chars_data_dir, out, init_from="resume"))
    reset()
    n = json.loads((other_chars_data_dir / "meta.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match=rf"--init_from {out}: its tokenizer \({n} tokens, vocab hash \w+\) is not "
                                         rf"the data's \({n} tokens"):
        train(tiny_cfg(other_chars_data_dir, tmp_path / "finetune", init_from=str(out)))


# -----------------------------------------------------------------------------
# the SLURM example: it can't run here; its syntax and its agreement with the trainer are checked


def test_slurm_example_is_valid_bash_and_matches_the_trainer():
    import re

    from nanogpt_hf.train_config import FIELDS

    folder = ROOT / "examples/slurm"
    scripts = sorted(folder.iterdir())
    assert {p.name for p in scripts} >= {"launch.sh", "train_1node.sbatch", "train_2nodes.sbatch"}
    for script in scripts:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    launch = (folder / "launch.sh").read_text()
    assert int(re.search(r"EXIT_SIGUSR1=(\d+)", launch)[1]) == guards.EXIT_CODES[signal.SIGUSR1]
    assert int(re.search(r"EXIT_SIGTERM=(\d+)", launch)[1]) == guards.EXIT_CODES[signal.SIGTERM]
    assert f"checkpoints/step_*/{ckpt.MANIFEST}" in launch and "--init_from resume" in launch.replace(
        '--init_from "$INIT_FROM"', "--init_from resume")
    assert (ROOT / re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", launch)[1]).is_file()
    for script in scripts:
        for flag in re.findall(r"(?<![\w-])--([a-z_]+)", script.read_text()):
            if "_" in flag or flag in ("out_dir",):  # train.py flags (SLURM's own have dashes)
                assert flag in FIELDS, f"{script.name}: --{flag} is not a train.py flag"
    for name in ("train_1node.sbatch", "train_2nodes.sbatch"):
        text = (folder / name).read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text and "launch.sh" in text
        assert re.search(r"#SBATCH --nodes=(\d)", text)[1] == ("1" if "1node" in name else "2")


def _agree_with_a_late_signal(rank, init_file, results):
    """A rank of a 2-process gloo group: rank 1 receives a real SIGTERM right after the stop flag's all-reduce
    (the worst moment); both ranks must still answer the same."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))  # what agreed() reads of it
    real_all_reduce = dist.all_reduce
    if rank == 1:
        def all_reduce_then_signal(*args, **kwargs):
            out = real_all_reduce(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before agreed() goes on
            return out
        dist.all_reduce = all_reduce_then_signal
    with guards.StopSignals() as stop:
        answers = [stop.agreed(accelerator)]
        dist.all_reduce = real_all_reduce
        answers.append(stop.agreed(accelerator))  # the late signal counts here, on both ranks
    results[rank] = answers
    dist.destroy_process_group()


def test_a_signal_right_after_the_all_reduce_stops_every_rank_at_the_same_call(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_agree_with_a_late_signal, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0] == results[1] == [False, True]
