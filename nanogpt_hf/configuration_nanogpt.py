"""NanoGPTConfig: the architecture of a nanoGPT model, in nanoGPT's own field names.

This file travels with every saved model (save_pretrained copies it next to config.json), so it imports
only transformers / huggingface_hub: `trust_remote_code=True` loading must work without nanogpt_hf installed.

    from nanogpt_hf import NanoGPTConfig
    config = NanoGPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

POSITION_EMBEDDINGS = ("learned", "alibi", "rope")


@strict
class NanoGPTConfig(PreTrainedConfig):
    model_type = "nanogpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache, under both its names
    # HF-generic names -> nanoGPT names; generate() builds its cache from num_hidden_layers etc.
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "hidden_size": "n_embd",
        "max_position_embeddings": "block_size",
    }

    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed (nanoGPT)
    block_size: int = 1024  # trained context length; a hard limit only for learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float | int = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    position_embedding: str = "learned"  # "learned" (GPT-2), "alibi" or "rope"
    rope_theta: float | int = 10000.0
    activation_function: str = "gelu_new"  # GPT-2's tanh GELU; "gelu" (exact) is what nanoGPT's model.py uses
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def validate_architecture(self):
        """Called by @strict after construction: fail early with a message naming the field."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NanoGPTConfig: {name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"NanoGPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"NanoGPTConfig: position_embedding must be one of {POSITION_EMBEDDINGS}, "
                f"got {self.position_embedding!r}"
            )
        if self.position_embedding == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"NanoGPTConfig: rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}"
            )
        if self.activation_function not in ("gelu_new", "gelu"):
            raise ValueError(
                f"NanoGPTConfig: activation_function must be 'gelu_new' or 'gelu', got {self.activation_function!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NanoGPTConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


__all__ = ["NanoGPTConfig"]
