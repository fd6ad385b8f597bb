"""Exports of a trained model for the engines people serve with, each a folder WITH the tokenizer
(examples/export.py is the command line; docs/serving.md has the measured results):

- `export_gpt2(src, dest)`: a vanilla GPT2LMHeadModel (learned positions only) with identical logits: vLLM serves it
  natively, llama.cpp's converter reads it. Without a tokenizer in the folder vLLM refuses every text prompt
  ("The decoder prompt cannot be empty"), so a model without one is refused here.
- `export_gguf(src, dest, converter)`: the GPT-2 export converted by llama.cpp's own `convert_hf_to_gguf.py`
  (not shipped by any pip package as a command: it is in a llama.cpp checkout and in the llama-cpp-python sdist,
  vendor/llama.cpp/). GPT-2 BPE models only: the converter recognises a BPE tokenizer by hashing how it encodes a
  fixed multilingual text and stops on any other ("BPE pre-tokenizer was not recognized"), and llama.cpp's GPT-2
  tokenizer reads byte-level symbols (Ġ for " ", Ċ for "\\n") where a character vocabulary stores the raw
  characters. llama.cpp's GPT-2 graph computes the tanh GELU ("gelu_new", our default): a model trained with the
  exact GELU ("gelu") runs there with the approximation (log-probs differ by ~1e-3).
- `export_onnx(src, dest)`: (input_ids, attention_mask) -> logits, dynamic batch and length, any position kind.

The out_dir itself is what vLLM serves for RoPE and learned positions (trust_remote_code=True); ALiBi is refused
there with the reason (see check_alibi_implementation in modeling_nanogpt.py).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .loading import load_model
from .tokenization import char_vocab

FORMATS = ("gpt2", "gguf", "onnx")


def _load(src):
    model, tokenizer = load_model(src, "cpu")
    if getattr(model.config, "model_type", None) != "nanogpt":
        raise ValueError(f"{src}: not a nanogpt_hf model (model_type {model.config.model_type!r})")
    return model.float().eval(), tokenizer


def _fresh(dest):
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest}: exists and is not empty; choose another --dest or remove it")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def is_char_level(tokenizer):
    try:
        char_vocab(tokenizer)
        return True
    except ValueError:
        return False


def export_gpt2(src, dest, model=None, tokenizer=None):
    """src: an out_dir / save_pretrained folder / Hub id -> dest: GPT2LMHeadModel + tokenizer. Returns dest."""
    if model is None:
        model, tokenizer = _load(src)
    if model.config.position_embedding != "learned":
        raise ValueError(f"{src} uses {model.config.position_embedding} positions; the GPT-2 architecture has learned "
                         "ones: serve the out_dir itself (vLLM, trust_remote_code=True) or export --to onnx")
    dest = _fresh(dest)
    model.to_gpt2().save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def export_gguf(src, dest, converter, outtype="f32"):
    """GPT-2 export, then llama.cpp's converter (run with this Python) -> dest/model-<outtype>.gguf, returned."""
    converter = Path(converter) if converter else None
    if converter is None or not converter.is_file():
        raise FileNotFoundError(
            f"--converter {converter}: need llama.cpp's convert_hf_to_gguf.py (a llama.cpp checkout, or the "
            "llama-cpp-python sdist: pip download --no-deps --no-binary :all: llama-cpp-python, vendor/llama.cpp/)")
    model, tokenizer = _load(src)
    if is_char_level(tokenizer):
        raise ValueError(
            f"{src} has a character-level tokenizer, which llama.cpp cannot use: its converter only accepts BPE "
            "tokenizers it recognises (by hash) and its GPT-2 tokenizer expects byte-level symbols, not raw ' ' and "
            "'\\n'; serve this model with vLLM (--to gpt2, or the out_dir) or ONNX (--to onnx)")
    if model.config.activation_function == "gelu":
        print("note: this model uses the exact GELU; llama.cpp's GPT-2 graph computes the tanh approximation, so "
              "its log-probs will differ slightly (~1e-3) from ours", file=sys.stderr)
    dest = _fresh(dest)
    hf_dir = export_gpt2(src, dest / "hf", model, tokenizer)
    out = dest / f"model-{outtype}.gguf"
    proc = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{converter.name} failed (exit {proc.returncode}): {last}")
    shutil.rmtree(hf_dir)
    tokenizer.save_pretrained(dest)  # the GGUF carries its own copy; this one is for our side of a comparison
    return out


class Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the graph an inference engine serves (no cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(src, dest):
    """dest/model.onnx ((input_ids, attention_mask) -> logits, dynamic batch <= 64 and length <= block_size for
    learned positions, 4 * block_size otherwise) + the tokenizer. Returns the .onnx path."""
    model, tokenizer = _load(src)
    dest = _fresh(dest)
    block = model.config.block_size
    longest = block if model.config.position_embedding == "learned" else 4 * block
    b, t = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=longest)
    shapes = {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: t}}
    ids = torch.zeros(2, min(8, block), dtype=torch.long)
    program = torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), dynamic_shapes=shapes, dynamo=True,
                                input_names=["input_ids", "attention_mask"], output_names=["logits"], verbose=False)
    path = dest / "model.onnx"
    program.save(str(path))
    tokenizer.save_pretrained(dest)
    return path


def export(src, to, dest=None, converter=None, outtype="f32"):
    """The command line's one entry point: returns what was written."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    dest = dest or f"{os.path.normpath(str(src))}-{to}"
    if to == "gpt2":
        return export_gpt2(src, dest)
    if to == "gguf":
        return export_gguf(src, dest, converter, outtype)
    return export_onnx(src, dest)
