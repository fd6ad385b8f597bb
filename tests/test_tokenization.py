"""Tokenizers: character level (round trip, unknown characters, save/load, pipeline) and GPT-2 BPE vs tiktoken.

    python -m pytest tests/test_tokenization.py -q
"""

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

from nanogpt_hf.data import load_tokenizer
from nanogpt_hf.tokenization import build_char_tokenizer, gpt2_tokenizer, load_pretrained_tokenizer


def test_char_tokenizer_is_nanogpt_stoi_and_round_trips(tiny_text):
    text = tiny_text.read_text(encoding="utf-8") + "a . b ,\t\n\n  x  "  # spaces cleanup would eat
    tok = build_char_tokenizer(text)
    chars = sorted(set(text))
    assert len(tok) == len(chars) + 1  # the characters, then <|endoftext|>
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == len(chars)
    ids = tok(text)["input_ids"]
    assert ids == [chars.index(c) for c in text]  # nanoGPT: stoi = {ch: i for i, ch in enumerate(sorted chars)}
    assert tok.decode(ids) == text
    assert len(build_char_tokenizer(text, eot=None)) == len(chars)  # the old layout: characters only


def test_char_tokenizer_special_token_never_eats_a_character(tmp_path):
    # pipeline() decodes with skip_special_tokens=True: every character (newlines too) must survive it, also
    # after a save/load round trip; the special token itself is what gets skipped
    text = "ab\nc d\n"
    build_char_tokenizer(text).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text + "<|endoftext|>"
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == len(set(text))


def test_char_tokenizer_unknown_characters_map_to_replacement():
    tok = build_char_tokenizer("ab c\n")
    ids = tok("a€b😀")["input_ids"]
    assert len(ids) == 4 and max(ids) < len(tok)  # never an id outside the vocab
    assert tok.decode(ids) == "a b "  # unknown -> the replacement character (a space here)
    assert build_char_tokenizer("xyz").decode(build_char_tokenizer("xyz")("q")["input_ids"]) == "x"
    with pytest.raises(ValueError, match="empty"):
        build_char_tokenizer("")


def test_char_tokenizer_save_load(tmp_path):
    text = "Hello, World!\n  tabs\there"
    build_char_tokenizer(text).save_pretrained(tmp_path / "tok")
    for tok in (AutoTokenizer.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not found"):
        load_pretrained_tokenizer(tmp_path / "missing")


def _nanogpt_model(vocab_size):
    nanogpt = pytest.importorskip("nanogpt_hf")
    cfg = nanogpt.NanoGPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8)
    return nanogpt.NanoGPTForCausalLM(cfg)


def _gpt2_model(vocab_size):
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=8, n_positions=64,
                                      bos_token_id=None, eos_token_id=None))


@pytest.mark.parametrize("make_model", [_gpt2_model, _nanogpt_model], ids=["gpt2", "nanogpt"])
def test_pipeline_text_generation_with_char_tokenizer(char_data_dir, tmp_path, make_model):
    tok = load_tokenizer(char_data_dir)
    torch.manual_seed(0)
    model = make_model(len(tok)).eval()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    gen = pipeline("text-generation", model=str(tmp_path / "model"))
    out = gen("KING:\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tok("KING:\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # manual greedy decoding
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == tok.decode(ids[0])
    assert out.startswith("KING:\n") and len(out) == len("KING:\n") + 8
    assert gen("KING €", max_new_tokens=2, do_sample=False)[0]["generated_text"]  # unknown char: no crash


def test_gpt2_tokenizer_matches_tiktoken(tiktoken_cache, tiny_text):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    tok = gpt2_tokenizer()
    text = tiny_text.read_text(encoding="utf-8") + " héllo 😀 \n\n  several   spaces\t\ttabs 12345 'll"
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert tok(text)["input_ids"] == enc.encode_ordinary(text)
    assert len(tok) == enc.n_vocab == 50257 and tok.eos_token_id == enc.eot_token == 50256
    assert tok.decode(enc.encode_ordinary(text)) == text
