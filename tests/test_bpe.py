"""Training a byte-level BPE with prepare (--tokenizer bpe --vocab_size N, --tokenizer_from DIR): deterministic, exactly
N tokens, byte-exact on any script, trained on the train split only, better than GPT-2's BPE on non-English text,
and shipped with the model a run trains on it.

    python -m pytest tests/test_bpe.py -q
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from conftest import make_text

from nanogpt_hf.data import TokenShards, load_tokenizer, read_meta
from nanogpt_hf.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parent.parent

LATIN = "the quick brown fox jumps over lazy dog while café naïve résumé Zürich straße".split()
CYRILLIC = "привет мир как дела хорошо спасибо москва город река лес поле книга ёжик".split()
CJK = ["你好", "世界", "学习", "中文", "東京", "日本語", "한국어", "안녕하세요"]
EMOJI = ["😀", "🚀", "👍🏽", "🇫🇷", "❤️"]
CODE = ["def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) { a[i] = 0; }", "if x != None:\n\tpass"]


def mixed_lines(n, seed=0):
    """Lines mixing Latin, Cyrillic, CJK, emoji and code, some with runs of spaces and tabs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        line = " ".join(rng.choice(LATIN + CYRILLIC + CJK + EMOJI) for _ in range(rng.randint(3, 10)))
        r = rng.random()
        out.append(rng.choice(CODE) + " " + line if r < 0.2 else line + " " * rng.randint(2, 6) + "\t\t  x"
                   if r > 0.8 else line)
    return out


def russian_text(n_chars, seed=0):
    """Deterministic Russian prose made of a few hundred words (the non-English corpus)."""
    rng = random.Random(seed)
    words = [a + b for a in ("при", "рас", "пере", "вы", "за", "по", "не", "об") for b in
             ("бежал", "читала", "говорил", "думали", "смотрит", "знает", "писать", "жить", "любовь", "дорога",
              "солнце", "город", "небо", "время", "слово", "дело", "сила", "земля")]
    parts, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize()
        parts.append(sentence + rng.choice([".", ",", "!", "?"]) + rng.choice([" ", "\n"]))
        size += len(parts[-1])
    return "".join(parts)


def test_bpe_is_deterministic_exact_and_round_trips_any_script(tmp_path):
    import numpy as np

    lines = mixed_lines(2000)
    # val (the last 10% of the characters) is the only place a made-up word occurs, 400 times; a word as frequent
    # in train becomes one token, and val's would too had the trainer seen val
    train = "\n".join(lines) + "\n" + " trainword" * 400 + "\n"
    val = (" zqxvalword" * 400 + "\n" + "\n".join(lines[:300]))[:-(-len(train) // 9)]
    text = train + val
    assert int(len(text) * 0.9) == len(train)
    (tmp_path / "mixed.txt").write_text(text, encoding="utf-8")
    metas = [prepare_dataset("mixed", inputs=[str(tmp_path / "mixed.txt")], tokenizer="bpe", vocab_size=520,
                             data_dir=tmp_path / name) for name in ("a", "b")]
    assert (tmp_path / "a/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer/tokenizer.json").read_bytes()
    assert metas[0] == metas[1]
    tok = load_tokenizer(tmp_path / "a")
    assert len(tok) == metas[0]["vocab_size"] == 520 and metas[0]["tokenizer"] == "bpe"
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    for line in lines + ["   leading", "trailing   ", "\n\n\t \n", "Ёжик в тумане 😀👍🏽 日本語のテキスト"]:
        assert tok.decode(tok(line)["input_ids"]) == line, line
    assert len(tok(" trainword")["input_ids"]) == 1 and len(tok(" zqxvalword")["input_ids"]) > 1
    assert tok.decode(np.concatenate(TokenShards(tmp_path / "a", "val").shards)) == val  # the shards: its ids


def test_bpe_compresses_russian_better_than_gpt2(tmp_path, tiktoken_cache, capsys):
    text = russian_text(120_000)
    (tmp_path / "ru.txt").write_text(text, encoding="utf-8")
    meta = prepare_dataset("ru", inputs=[str(tmp_path / "ru.txt")], tokenizer="bpe", vocab_size=600,
                           data_dir=tmp_path / "ru")
    c = meta["compression"]
    assert c["bytes"] == len(text[int(len(text) * 0.9):].encode("utf-8"))  # all of val, which train never saw
    ratio = c["bytes_per_token"] / c["gpt2_bytes_per_token"]  # > 1: fewer tokens per byte than GPT-2's BPE
    assert "compression on val" in capsys.readouterr().out
    with capsys.disabled():  # the number the report quotes (pytest -s)
        print(f"\nRussian val: {c['bytes_per_token']:.2f} bytes/token, GPT-2's BPE {c['gpt2_bytes_per_token']:.2f}: "
              f"{ratio:.2f}x fewer tokens")
    assert ratio > 1.5
    assert json.loads((tmp_path / "ru/meta.json").read_text())["compression"] == c


def test_tokenizer_from_reuses_a_trained_bpe_and_bad_flags_are_one_line(tmp_path, tiny_text):
    from test_prepare_cli import cli_error

    prepare_dataset("a", inputs=[str(tiny_text)], tokenizer="bpe", vocab_size=300, data_dir=tmp_path / "a")
    (tmp_path / "other.txt").write_text(make_text(5000, seed=9), encoding="utf-8")
    meta = prepare_dataset("b", inputs=[str(tmp_path / "other.txt")], tokenizer_from=str(tmp_path / "a"),
                           data_dir=tmp_path / "b")
    assert meta["tokenizer"] == "bpe" and meta["tokenizer_from"] == str(tmp_path / "a") and meta["vocab_size"] == 300
    assert (tmp_path / "a/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer/tokenizer.json").read_bytes()
    d = tmp_path / "x"
    assert "--vocab_size" in cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer", "bpe", "--data_dir", d)
    assert "at least 257" in cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer", "bpe", "--vocab_size",
                                       "100", "--data_dir", d)
    assert "too little text" in cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer", "bpe",
                                          "--vocab_size", "60000", "--data_dir", d)
    assert "--vocab_size goes with --tokenizer bpe" in cli_error("--dataset", "x", "--input", tiny_text,
                                                                 "--vocab_size", "300", "--data_dir", d)
    prepare_dataset("c", inputs=[str(tiny_text)], tokenizer="char", data_dir=tmp_path / "c")
    assert "not a byte-level BPE" in cli_error("--dataset", "x", "--input", tiny_text, "--tokenizer_from",
                                               tmp_path / "c", "--data_dir", d)
    assert not (d / "meta.json").exists()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_model_trained_on_a_bpe_ships_it(tmp_path):
    from transformers import AutoTokenizer, pipeline

    (tmp_path / "t.txt").write_text(make_text(60_000, seed=4), encoding="utf-8")
    prepare_dataset("t", inputs=[str(tmp_path / "t.txt")], tokenizer="bpe", vocab_size=400, data_dir=tmp_path / "d")
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "examples" / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    out = tmp_path / "out"
    train_cli.main(["--data_dir", str(tmp_path / "d"), "--out_dir", str(out), "--n_layer", "1", "--n_head", "2",
                    "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                    "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--warmup_iters", "1",
                    "--lr_decay_iters", "4", "--cpu", "true", "--mixed_precision", "no", "--sample_at_end", "0"])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.backend_tokenizer.to_str() == load_tokenizer(tmp_path / "d").backend_tokenizer.to_str()
    gen = pipeline("text-generation", model=str(out), tokenizer=tok)
    text = gen("KING HENRY:\nThe", max_new_tokens=12, do_sample=True)[0]["generated_text"]
    assert isinstance(text, str) and text.startswith("KING HENRY:\nThe") and len(text) > len("KING HENRY:\nThe")
    assert read_meta(tmp_path / "d")["vocab_size"] == 400
