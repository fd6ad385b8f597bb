"""
Export a trained model for the engines people serve with; every folder gets the tokenizer.

    python examples/export.py out-shakespeare-char --to gpt2     # GPT2LMHeadModel: vLLM serves it natively
    python examples/export.py out-gpt2-small --to gguf --converter llama.cpp/convert_hf_to_gguf.py   # llama.cpp
    python examples/export.py out-shakespeare-char --to onnx     # model.onnx: (input_ids, attention_mask) -> logits

MODEL: a train.py out_dir, any save_pretrained folder of a nanogpt_hf model, or a Hub id. --dest defaults to
MODEL-<format> next to it and must be new or empty.

gpt2: learned positions only (RoPE/ALiBi models have no GPT-2 equivalent; vLLM serves a RoPE out_dir directly
  with trust_remote_code=True, see docs/serving.md).
gguf: the gpt2 export run through llama.cpp's own converter (convert_hf_to_gguf.py from a llama.cpp checkout, or
  from the llama-cpp-python sdist's vendor/llama.cpp/), with this Python; it needs the `gguf` package. GPT-2 BPE
  models only: character-level tokenizers are refused (llama.cpp's converter and tokenizer cannot read them).
onnx: dynamic batch and length, any position kind; needs `pip install nanogpt_hf[export]`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.cli import error_boundary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="out_dir, save_pretrained folder or Hub id of a nanogpt_hf model")
    p.add_argument("--to", required=True, choices=("gpt2", "gguf", "onnx"), help="what to write")
    p.add_argument("--dest", default=None, help="output folder (default: MODEL-<format>)")
    p.add_argument("--converter", default=None, help="--to gguf: path of llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                   help="--to gguf: weight type (f32: the exact numbers)")
    return p.parse_args(argv)


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    args = parse_args(argv)
    from transformers.utils import logging

    from nanogpt_hf.export import export  # after --help: importing torch takes seconds

    logging.disable_progress_bar()  # stderr keeps to our notes and the one-line error
    try:
        path = export(args.model, args.to, dest=args.dest, converter=args.converter, outtype=args.outtype)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
