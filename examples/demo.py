"""
A web demo of a trained model: prompt, temperature, top-k, max tokens, the text streamed as it is generated, and
what the run left behind (the model's facts, its losses and loss curve).

    pip install "nanogpt_hf[demo]"      # gradio
    python examples/demo.py --model out-shakespeare-char            # then open http://127.0.0.1:7860
    python examples/demo.py --model user/my-model --port 8000       # a Hub id works too

This file imports only torch, transformers, huggingface_hub and gradio (nanogpt_hf when it is installed), so it
runs as a Hugging Face Space's app.py as is: `space_files(repo_id)` gives the Space's files (app.py = this file with
the model id filled in, requirements.txt, README.md), ready for huggingface_hub's upload_folder(repo_type="space").
"""

import argparse
import json
import os
import sys
from pathlib import Path
from threading import Thread

MODEL = os.environ.get("NANOGPT_DEMO_MODEL")  # a Space's app.py has its model id here (see space_files)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # in a checkout: nanogpt_hf next to examples/
try:  # our code when it is there: the error boundary of every script (a bad --model or flag is one line)
    from nanogpt_hf.cli import error_boundary
except ImportError:  # a Space's app.py, with only the model's own copy of our code: errors go to its logs as they are
    def error_boundary(main):
        return main


def load(name):
    """(model, tokenizer) from an out_dir / save_pretrained folder or a Hub id: with nanogpt_hf, through its one
    model loader (damaged files, other tokenizers: one line naming them); else as remote code (a Space)."""
    try:
        from nanogpt_hf.loading import load_model
    except ImportError:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    return load_model(name, "cpu")


def run_file(name, filename):
    """A file the training run wrote next to the model (results.json, loss_curve.png, ...), or None."""
    if os.path.isdir(name):
        path = Path(name) / filename
        return str(path) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(name, filename)
    except Exception:  # not in the repo, or offline: the demo shows what it has
        return None


def facts(name, model):
    """Markdown: what the model is and how it trained (from config.json and results.json)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    rows = [("model", f"`{name}`"), ("parameters", f"{params / 1e6:.2f}M"),
            ("layers / heads / width", f"{c.num_hidden_layers} / {c.num_attention_heads} / {c.hidden_size}"),
            ("context (block_size)", c.max_position_embeddings), ("vocabulary", c.vocab_size),
            ("positions", getattr(c, "position_embedding", "learned"))]
    path = run_file(name, "results.json")
    results = json.loads(Path(path).read_text()) if path else {}
    for key, label in (("val_loss", "val loss"), ("train_loss", "train loss"), ("iter", "iterations"),
                       ("tokens_seen", "tokens seen"), ("dataset", "dataset"), ("hardware", "trained on")):
        if results.get(key) is not None:
            value = results[key]
            rows.append((label, f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
                         if isinstance(value, int) else value))
    return "| model card | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def generate_stream(model, tokenizer, prompt, temperature, top_k, max_new_tokens):
    """Yields the text so far as tokens arrive (generate() on a thread, a TextIteratorStreamer in between)."""
    import torch
    from transformers import TextIteratorStreamer

    ids = tokenizer(prompt or "\n", return_tensors="pt")["input_ids"]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=int(top_k)) if temperature > 0 \
        else dict(do_sample=False)  # temperature 0: greedy
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                  streamer=streamer, pad_token_id=pad, **sampling)
    thread = Thread(target=torch.no_grad()(model.generate), kwargs=kwargs, daemon=True)
    thread.start()
    text = prompt
    for piece in streamer:
        text += piece
        yield text
    thread.join()


def build_app(name, model, tokenizer):
    import gradio as gr

    with gr.Blocks(title=f"nanogpt_hf: {name}") as app:
        gr.Markdown(f"# {Path(name).name if os.path.isdir(name) else name}\nA nanoGPT model trained with nanogpt_hf.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="prompt", value="\n", lines=3)
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0: greedy)")
                    top_k = gr.Slider(0, 500, value=200, step=1, label="top-k (0: all tokens)")
                    max_tokens = gr.Slider(1, 1000, value=200, step=1, label="max new tokens")
                button = gr.Button("Generate", variant="primary")
                output = gr.Textbox(label="text", lines=16)
            with gr.Column(scale=2):
                gr.Markdown(facts(name, model))
                curve = run_file(name, "loss_curve.png")
                if curve:
                    gr.Image(curve, label="loss curve", show_label=True)

        def stream(p, t, k, n):
            yield from generate_stream(model, tokenizer, p, t, k, n)

        button.click(stream, [prompt, temperature, top_k, max_tokens], output, api_name="generate")
    return app


def space_files(repo_id):
    """{filename: text} of a Gradio Space that demos the model repo_id (app.py is this very file)."""
    source = Path(__file__).read_text(encoding="utf-8")
    line = 'MODEL = os.environ.get("NANOGPT_DEMO_MODEL")'
    app = source.replace(line, f'MODEL = os.environ.get("NANOGPT_DEMO_MODEL", {repo_id!r})', 1)
    readme = (f"---\ntitle: {repo_id.split('/')[-1]}\nsdk: gradio\napp_file: app.py\nmodels:\n- {repo_id}\n---\n\n"
              f"A demo of [{repo_id}](https://huggingface.co/{repo_id}), trained with nanogpt_hf.\n")
    return {"app.py": app, "requirements.txt": "torch\ntransformers>=5.4\nhuggingface_hub\n", "README.md": readme}


@error_boundary
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, required=MODEL is None, help="out_dir, save_pretrained folder or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: reachable from others)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be between 1 and 65535")
    model, tokenizer = load(args.model)  # before gradio: a bad --model is one line, with or without it
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('error: the demo needs gradio: pip install "nanogpt_hf[demo]" (or pip install gradio)')
    app = build_app(args.model, model, tokenizer)
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
