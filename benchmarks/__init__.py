"""The benchmarks behind examples/bench.py (nanoGPT's bench.py, plus side-by-side comparisons), outside the
library: they call nanogpt_hf's public functions, and nothing in nanogpt_hf imports them.

    common.py             shapes (PRESETS), the models under test built alike, the alternating timer
    train_step.py         one training step: nanogpt_hf vs GPT2LMHeadModel vs plain PyTorch; fp32 vs bf16
    generation.py         greedy tokens/s with and without the KV cache; sample.py's job vs nanoGPT's loop
    data_loader.py        the cost of sampling a batch, as a share of a step
    prepare.py            examples/prepare.py's tokens/s vs the bare tokenizer, and its cached re-run
    time_to_loss.py       time to a target val loss, configs side by side (AdamW vs Muon)
    reference_nanogpt.py  the plain-PyTorch nanoGPT model (the speed reference; tests use it too)

Run them from a checkout (`python examples/bench.py ...`, or with the checkout on sys.path); the results
with their commands are in docs/performance.md.
"""
