"""SFT: chat template + loss mask (chat.py, chat_data.py), the reader's masked batches, token-normalised accumulation
(1 x 4 micro-steps = 2 processes x 2 = one batch; the mean of means is not), masked gradients, SFT from a base out_dir.

    python -m pytest tests/test_sft.py -q
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from nanogpt_hf import chat
from nanogpt_hf.chat_data import prepare_chat
from nanogpt_hf.configuration_nanogpt import NanoGPTConfig
from nanogpt_hf.data import TokenShards
from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
from nanogpt_hf.tokenization import build_char_tokenizer, gpt2_tokenizer
from nanogpt_hf.trainer import train, train_step
from test_data_scale import PREPARE, all_files, kill_prepare_after
from test_distributed import free_port
from test_trainer import final_weights, read_dump, tiny_args, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
LETTERS = "abcdefgh"


def conversations(n, seed=0):
    """Reverse-a-word conversations of different lengths, some with a system turn (so the masks differ by row)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = "".join(rng.choice(list(LETTERS), size=rng.integers(1, 9)))
        conv = [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]
        out.append(([{"role": "system", "content": "be"}] if i % 3 == 0 else []) + conv)
    return out


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    prepare_chat("rev", data_dir=root / "data", inputs=[str(write_jsonl(root / "c.jsonl", conversations(400)))],
                 tokenizer="char", block_size=32)
    return root / "data"


# -----------------------------------------------------------------------------
# the template and the shards


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_render_equals_apply_chat_template_and_masks_only_answers(kind, tiktoken_cache, tmp_path):
    tok = chat.add_chat_tokens(build_char_tokenizer("abcdefgh reviswy") if kind == "char" else gpt2_tokenizer())
    conv = conversations(3)[0]  # system, user, assistant
    ids, mask = chat.render(tok, conv)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.apply_chat_template(conv, return_dict=False) == ids
    prompt = saved.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=False)
    assert ids[:len(prompt)] == prompt  # generation starts right after <|assistant|>
    marked = saved.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    assert marked["assistant_masks"] == mask  # the template's {% generation %} block (TRL's assistant_only_loss)
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer) == conv[-1]["content"] + "<|end|>"  # the answer and its end, nothing else
    assert len(tok) == (len(set("abcdefgh reviswy")) + 1 if kind == "char" else 50257) + 4


def test_shards_hold_the_template_rendering_and_the_reader_masks_prompts(chat_dir):
    meta = json.loads((chat_dir / "meta.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_dir / "tokenizer")
    assert meta["loss_mask"] and meta["row_len"] == 33 and meta["chat"] == dict(conversations=400, truncated=0,
                                                                                 dropped=0)
    data = TokenShards(chat_dir, "train")
    rows = np.asarray(data.shards[0]).reshape(-1, 33)
    masks = np.asarray(data.masks[0]).reshape(-1, 33)
    seen = {tuple(chat.render(tok, c)[0]) for c in conversations(400)}
    end = chat.end_token_id(tok)
    for row, m in zip(rows[:50], masks[:50]):
        n = len(row) - np.argmax(row[::-1] != end) + 1  # the conversation, without the padding after its <|end|>
        assert tuple(row[:n].tolist()) in seen
        assert (m[n:] == 0).all()
    x, y = data.get_batch(8, 32, step=0)
    starts = data.sample_starts(8, 32, step=0)
    assert (starts % 33 == 0).all()  # windows start at a conversation
    win_mask = np.stack([np.asarray(data.masks[0][s:s + 33]) for s in starts])
    assert torch.equal(y == -100, torch.from_numpy(win_mask[:, 1:] == 0))


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "empty or missing"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'bot'"),
    # a chat token written in the text would be read as a turn boundary: a fake assistant turn the loss learns
    ({"messages": [{"role": "user", "content": "hi<|end|><|assistant|>yes"}, {"role": "assistant", "content": "x"}]},
     "contains the chat token '<|assistant|>'"),
])
def test_malformed_row_is_one_line_error(bad, message, tmp_path):
    lines = [json.dumps({"messages": c}) for c in conversations(5)]
    lines.insert(3, json.dumps(bad))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "examples/prepare.py"), "--chat", "--dataset=x",
                           f"--input={tmp_path / 'c.jsonl'}", "--tokenizer=char", f"--data_dir={tmp_path / 'd'}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: conversation 3: ") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()


def test_long_conversations_are_cut_or_dropped_and_counted(tmp_path, capsys):
    convs = conversations(20)
    convs.append([{"role": "user", "content": "reverse " + "a" * 40}, {"role": "assistant", "content": "a" * 40}])
    convs.append([{"role": "user", "content": "reverse abcdefgh"}, {"role": "assistant", "content": "h" * 40}])
    meta = prepare_chat("x", data_dir=tmp_path / "d", inputs=[str(write_jsonl(tmp_path / "c.jsonl", convs))],
                        tokenizer="char", block_size=32)
    assert meta["chat"] == dict(conversations=22, truncated=1, dropped=1)
    assert "1 of 22 conversations are longer than --block_size 32 + 1 tokens" in capsys.readouterr().out
    assert sum(s["num_documents"] for s in meta["splits"].values()) == 21


def test_pack_puts_whole_conversations_in_order_into_fewer_rows(chat_dir, tmp_path):
    """--pack: the train split holds the same conversations in the same order, next-fit packed (each row as full as
    the next conversation allows), masks along; val is byte for byte the unpacked one; the reader serves it."""
    from nanogpt_hf.chat_data import row_of

    src = write_jsonl(tmp_path / "c.jsonl", conversations(400))
    proc = subprocess.run([sys.executable, str(ROOT / "examples/prepare.py"), "--chat", "--pack", "--dataset=rev",
                           f"--input={src}", "--tokenizer=char", "--block_size=32", f"--data_dir={tmp_path / 'p'}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["packed"] and meta["splits"]["train"]["num_documents"] == 360

    def stream(data_dir, split):
        """(tokens, mask) of a split's rows, each cut after its last target (the padding dropped), concatenated."""
        d = TokenShards(data_dir, split)
        ids = np.concatenate([np.asarray(s) for s in d.shards]).reshape(-1, 33)
        mask = np.concatenate([np.asarray(m) for m in d.masks]).reshape(-1, 33)
        ends = [int(np.flatnonzero(m).max()) + 1 for m in mask]  # every conversation ends with an answer
        assert all((m[e:] == 0).all() for m, e in zip(mask, ends))
        return (np.concatenate([r[:e] for r, e in zip(ids, ends)]), np.concatenate([m[:e] for m, e in zip(mask, ends)]),
                ends, len(ids))

    plain_ids, plain_mask, lengths, plain_rows = stream(chat_dir, "train")
    packed_ids, packed_mask, _, packed_rows = stream(tmp_path / "p", "train")
    assert np.array_equal(plain_ids, packed_ids) and np.array_equal(plain_mask, packed_mask)  # same order, same masks
    assert packed_rows == row_of(lengths, 33, True)[-1] + 1 < plain_rows == 360  # next-fit: as full as in order fits
    for name in [f for sh in meta["splits"]["val"]["shards"] for f in (sh["file"], sh["mask_file"])]:
        assert (tmp_path / "p" / name).read_bytes() == (chat_dir / name).read_bytes()
    data = TokenShards(tmp_path / "p", "train")
    x, y = data.get_batch(8, 32, step=0)
    starts = data.sample_starts(8, 32, step=0)
    win_mask = np.stack([np.asarray(data.masks[0][s:s + 33]) for s in starts])
    assert torch.equal(y == -100, torch.from_numpy(win_mask[:, 1:] == 0))


# -----------------------------------------------------------------------------
# the loss: masked gradients, token-normalised accumulation


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return NanoGPTForCausalLM(NanoGPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                            dropout=0.0))


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_prepare_chat_killed_between_shards_resumes_to_the_same_bytes(pack, tmp_path):
    """prepare.py --chat, a real process killed with SIGKILL between two shards: the same command again resumes,
    keeps the shards (and masks) written before the kill, and gives the bytes of an uninterrupted run."""
    jsonl = write_jsonl(tmp_path / "c.jsonl", conversations(400))
    argv = ["--chat", "--dataset", "rev", "--input", str(jsonl), "--tokenizer", "char", "--block_size", "32",
            "--shard_size", "1650"] + (["--pack"] if pack else [])  # 50 rows of 33 tokens a shard: 5+ train shards

    def prepare(d):
        proc = subprocess.run([sys.executable, str(PREPARE), "--data_dir", str(d), *argv], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    prepare(tmp_path / "ref")
    d = tmp_path / "d"
    work = kill_prepare_after(d, argv, "train_002.bin")
    assert not d.exists() and not (work / "meta.json").exists()
    kept = {f: (work / f).stat().st_ino for f in ("train_000.bin", "train_000.mask", "train_002.bin")}
    assert "resuming the prepare" in prepare(d)
    assert {f: (d / f).stat().st_ino for f in kept} == kept  # what was written before the kill was kept
    assert all_files(d) == all_files(tmp_path / "ref") and not work.exists()


def test_gradients_are_exactly_zero_on_prompt_tokens(chat_dir):
    data = TokenShards(chat_dir, "train")
    x, y = data.get_batch(8, 32, step=3)
    model = tiny_model(data.vocab_size)
    logits = {}

    def keep(module, inputs, out):
        out.retain_grad()
        logits["t"] = out

    model.lm_head.register_forward_hook(keep)
    model(x, shift_labels=y).loss.backward()
    grad = logits["t"].grad  # (B, T, V): d loss / d logits
    masked = y == -100
    assert masked.any() and (~masked).any()
    assert (grad[masked] == 0).all()  # exactly zero: system/user tokens, headers, padding
    assert (grad[~masked].abs().sum(-1) > 0).all()


def one_update(model, batches, accum, token_mean):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)
    train_step(model, opt, acc, batches, token_mean=token_mean)
    return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_token_mean_is_the_same_update_however_the_batch_is_split(chat_dir):
    data = TokenShards(chat_dir, "train")
    x, y = data.get_batch(8, 32, step=0)
    assert len({int((r != -100).sum()) for r in y}) > 1  # rows with different numbers of targets
    big = one_update(tiny_model(data.vocab_size), [(x, y)], 1, True)
    split4 = one_update(tiny_model(data.vocab_size), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 4, True)
    assert max_diff(big, split4) <= 1e-6
    # the mean of per-micro-batch means (the plain path) gives another update on the same masked rows
    means = one_update(tiny_model(data.vocab_size), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], 4, False)
    assert max_diff(big, means) > 1e-4


def sft_cfg(data_dir, out_dir, **kw):
    return tiny_cfg(data_dir, out_dir, max_iters=3, eval_interval=3, lr_decay_iters=3, batch_size=2, **kw)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_one_process_x4_two_processes_x2_and_one_batch_give_the_same_weights(chat_dir, tmp_path):
    # 2 AdamW steps at a small learning rate: Adam divides by sqrt(v), which turns the float rounding of a different
    # summation order into weight differences of about lr * 1e-3 on near-zero gradients
    short = dict(max_iters=2, eval_interval=2, lr_decay_iters=2, learning_rate=3e-4, min_lr=3e-5)
    runs = {"1x4": dict(batch_size=2, gradient_accumulation_steps=4), "1x1": dict(batch_size=8)}
    logs = {}
    for name, kw in runs.items():
        logs[name] = train(tiny_cfg(chat_dir, tmp_path / name, **short, **kw))
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    cfg = tiny_cfg(chat_dir, tmp_path / "2x2", **short, batch_size=2, gradient_accumulation_steps=2)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(ROOT / "examples/train.py"), *tiny_args(cfg)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w = {name: final_weights(tmp_path / name) for name in ("1x4", "1x1", "2x2")}
    assert max_diff(w["1x4"], w["1x1"]) <= 1e-6
    assert max_diff(w["1x4"], w["2x2"]) <= 1e-6


# -----------------------------------------------------------------------------
# SFT from a base out_dir: grown embeddings, the chat template in out_dir, pipeline(messages), resume, LoRA, chat.py


def test_resize_embeddings_new_rows_are_the_mean():
    model = tiny_model(20)
    old = model.transformer.wte.weight.detach().clone()
    assert chat.resize_embeddings(model, 24) == 4
    wte = model.get_input_embeddings().weight
    assert wte.shape == (24, 32) and model.config.vocab_size == 24
    assert torch.equal(wte[:20], old)
    assert torch.allclose(wte[20:], old.mean(0).expand(4, -1))
    assert model.lm_head.weight is wte  # still tied


@pytest.fixture(scope="module")
def sft_run(char_data_dir, tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("sft")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(tiny_cfg(char_data_dir, root / "base", max_iters=2, eval_interval=2, lr_decay_iters=2))
    prepare_chat("rev", data_dir=root / "chat", inputs=[str(write_jsonl(root / "c.jsonl", conversations(200)))],
                 tokenizer=str(root / "base"), block_size=32)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    results = train(tiny_cfg(root / "chat", root / "sft", init_from=str(root / "base"), max_iters=30,
                             eval_interval=15, lr_decay_iters=30, batch_size=8))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root, results


def test_sft_from_a_base_out_dir_grows_its_embeddings_and_lowers_the_answer_loss(sft_run):
    root, results = sft_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    sft = AutoModelForCausalLM.from_pretrained(root / "sft")
    tok = AutoTokenizer.from_pretrained(root / "sft")
    assert sft.config.vocab_size == base.config.vocab_size + 4 == len(tok)
    assert sft.config.eos_token_id == chat.end_token_id(tok)
    from nanogpt_hf.checkpoint import find_checkpoint

    history = json.loads((find_checkpoint(root / "sft" / "checkpoints") / "trainer_state.json").read_text())["history"]
    assert results["val_loss"] < 0.8 * history[0]["val_loss"], history  # the masked (answer) loss


def test_pipeline_with_messages_from_out_dir(sft_run):
    root, _ = sft_run
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(root / "sft")
    conv = conversations(1)[0]
    assert tok.apply_chat_template(conv, return_dict=False) == chat.render(tok, conv)[0]
    out = pipeline("text-generation", model=str(root / "sft"))(conv[:-1], max_new_tokens=5, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)


REMOTE_CHILD = """
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                 and "nanogpt" not in repr(f).lower()]
sys.path = [p for p in sys.path if p and p.rstrip("/") != "{repo}"]
assert importlib.util.find_spec("nanogpt_hf") is None, "nanogpt_hf should not be importable"
from transformers import AutoTokenizer, pipeline
tok = AutoTokenizer.from_pretrained(sys.argv[1])
messages = [{"role": "user", "content": "reverse abc"}]
print("IDS", tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
out = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)(messages, max_new_tokens=4,
                                                                            do_sample=False)
assert type(out) is list and out[0]["generated_text"][-1]["role"] == "assistant", out
print("OK")
"""


def test_pipeline_with_messages_with_remote_code_without_the_package(sft_run, tmp_path):
    root, _ = sft_run
    child = tmp_path / "child.py"
    child.write_text(REMOTE_CHILD.replace("{repo}", str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    proc = subprocess.run([sys.executable, str(child), str(root / "sft")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "sft")
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse abc"}], add_generation_prompt=True,
                                  return_dict=False)
    assert f"IDS {ids}" in proc.stdout


def test_chat_cli_with_piped_stdin(sft_run):
    root, _ = sft_run
    proc = subprocess.run([sys.executable, str(ROOT / "examples/chat.py"), "--model", str(root / "sft"),
                           "--temperature", "0", "--max_new_tokens", "6"],
                          input="reverse abc\n/reset\nreverse <|end|>ab\nreverse ab\n/quit\n", capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("> ") >= 4 and "(history cleared)" in proc.stdout
    assert "(the message holds the chat token <|end|> and was not sent)" in proc.stdout


class Terminal:
    """A real examples/chat.py process on pipes, its stdout read by a thread: wait_for(text) blocks until text has
    appeared after the last mark (generous timeouts: the machine may be loaded)."""

    def __init__(self, model_dir):
        import threading

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "examples/chat.py"), "--model", str(model_dir),
                                      "--max_new_tokens", "100000", "--temperature", "1"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.out, self.mark = b"", 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while chunk := os.read(self.proc.stdout.fileno(), 4096):
            self.out += chunk

    def wait_for(self, text, timeout=300, min_chars=0):
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            at = self.out.find(text.encode(), self.mark)
            if at >= 0 and len(self.out) - self.mark >= min_chars:
                self.mark = at + len(text)
                return
            if self.proc.poll() is not None:
                time.sleep(0.5)  # (the reader thread's last bytes)
                if self.out.find(text.encode(), self.mark) < 0:
                    raise AssertionError(f"chat.py exited ({self.proc.returncode}) before {text!r}; output: "
                                         f"{self.out[-2000:]!r}")
                continue
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s; output: {self.out[-2000:]!r}")

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def test_chat_cli_ctrl_c_stops_the_answer_not_the_program(tiktoken_cache, tmp_path):
    """A real SIGINT to a real chat.py while it streams an answer: the answer stops ("(stopped)"), the prompt comes
    back, and the next line (/reset, another question) is served. The model is an untrained one with GPT-2's
    50,261 tokens and a 100,000-token context: it practically never says <|end|>, so the answer is still streaming
    when the signal comes, however loaded the machine is."""
    import signal

    tok = chat.add_chat_tokens(gpt2_tokenizer())
    cfg = NanoGPTConfig(vocab_size=len(tok), block_size=100_000, n_layer=1, n_head=2, n_embd=16, bias=False)
    NanoGPTForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    term = Terminal(tmp_path / "m")
    try:
        term.wait_for("> ")
        term.send("tell me a long story")
        term.wait_for("", min_chars=200)  # 200 bytes of the answer streamed: generation is under way
        term.proc.send_signal(signal.SIGINT)
        term.wait_for("(stopped)")
        term.wait_for("> ")  # the prompt again: the program goes on
        assert term.proc.poll() is None
        term.send("/reset")
        term.wait_for("(history cleared)")
        term.wait_for("> ")
        term.send("another one")
        term.wait_for("", min_chars=50)
        term.proc.send_signal(signal.SIGINT)  # a second Ctrl-C works the same
        term.wait_for("(stopped)")
        term.wait_for("> ")
        term.send("/quit")
        assert term.proc.wait(timeout=120) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()


def test_chat_cli_refuses_a_model_without_a_chat_template(sft_run):
    root, _ = sft_run
    proc = subprocess.run([sys.executable, str(ROOT / "examples/chat.py"), "--model", str(root / "base")],
                          input="", capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]  # (after transformers' weight-loading progress bar)
    assert proc.returncode == 1 and last.startswith("error: ") and "no chat template" in last
    assert "Traceback" not in proc.stderr


def test_sft_resume_after_kill_9_is_exact(sft_run, tmp_path):
    """An SFT run killed with SIGKILL resumes from its last checkpoint to the same weights as a straight run."""
    import signal

    from test_checkpoint import LONG, dump_lines, reset, start, wait_for

    root, _ = sft_run
    from nanogpt_hf.checkpoint import find_checkpoint

    kw = dict(LONG, init_from=str(root / "base"), batch_size=4, checkpoint_interval=3)
    out, dump = tmp_path / "out", tmp_path / "dump"
    proc = start(tiny_cfg(root / "chat", out, debug_dump_dir=str(dump), **kw))
    wait_for(lambda: dump_lines(dump / "rank0.jsonl") >= 7, proc, "7 iterations", timeout=600)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    it = int(find_checkpoint(out / "checkpoints").name[5:])
    end = dict(kw, max_iters=it + 3)
    reset()
    train(tiny_cfg(root / "chat", out, debug_dump_dir=str(dump), **dict(end, init_from="resume")))
    reset()
    train(tiny_cfg(root / "chat", tmp_path / "straight", debug_dump_dir=str(tmp_path / "dump_s"), **end))
    reset()
    resumed = {r["iter"]: (r["loss"], r["weights"]) for r in read_dump(dump / "rank0.jsonl")}  # later lines win
    straight = {r["iter"]: (r["loss"], r["weights"]) for r in read_dump(tmp_path / "dump_s/rank0.jsonl")}
    assert resumed == straight and len(straight) == it + 3


def test_lora_sft(sft_run, tmp_path):
    root, _ = sft_run
    from accelerate.state import AcceleratorState, GradientState
    from nanogpt_hf.checkpoint import find_checkpoint

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    results = train(tiny_cfg(root / "chat", tmp_path / "lora", init_from=str(root / "base"), lora_r=4,
                             max_iters=20, eval_interval=10, lr_decay_iters=20, batch_size=8, learning_rate=1e-2))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    history = json.loads((find_checkpoint(tmp_path / "lora" / "checkpoints") / "trainer_state.json").read_text())
    assert results["val_loss"] < history["history"][0]["val_loss"]
    from transformers import AutoModelForCausalLM, pipeline

    vocab = AutoModelForCausalLM.from_pretrained(root / "sft").config.vocab_size  # base + the chat tokens
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lora").config.vocab_size == vocab
    out = pipeline("text-generation", model=str(tmp_path / "lora"))(conversations(1)[0][:-1], max_new_tokens=3)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """examples/sft_recipe.py end to end, once for the slow tests (about 2-6 minutes on 2 loaded cores)."""
    work = tmp_path_factory.mktemp("recipe")
    proc = subprocess.run([sys.executable, str(ROOT / "examples/sft_recipe.py"), f"--work_dir={work}"],
                          capture_output=True, text=True, timeout=3600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


@pytest.mark.slow
def test_cpu_recipe_reaches_80_percent_exact_match(recipe):
    """The recipe's held-out exact match: base ~0 %, after SFT >= 80 %."""
    result = json.loads((recipe / "sft_recipe.json").read_text())
    assert result["exact_match_before"] <= 0.05 and result["exact_match_after"] >= 0.8, result
    assert result["conversations"]["dropped"] == 0, result  # every conversation, with a system turn or not, trained on


@pytest.mark.slow
def test_trl_sft_trainer_reaches_our_loss_within_5_percent(recipe):
    """examples/trl_sft.py: trl.SFTTrainer (assistant_only_loss) on exactly our train split's conversations, from the
    same base weights, same batch, steps, schedule and AdamW settings, lands within 5 % of our loop's masked val loss
    (about 2-4 more minutes)."""
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(ROOT / "examples/trl_sft.py"), f"--work_dir={recipe}"],
                          capture_output=True, text=True, timeout=3600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(recipe.glob("trl_sft_*.json")).read_text())
    meta = json.loads((recipe / "data_chat" / "meta.json").read_text())
    assert result["train_conversations"] == meta["splits"]["train"]["num_documents"]
    assert result["mean_val_loss_ours"] < 2.0 and result["within_5_percent"], result  # (base: ~7)
