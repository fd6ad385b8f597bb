"""The nanoGPT model as a transformers PreTrainedModel.

Same modules and parameter names as karpathy/nanoGPT's model.py (transformer.wte/wpe/h/ln_f + lm_head), so
nanoGPT checkpoints and GPT-2 weights load by renaming nothing; plus what the HF ecosystem expects: the
Cache API for KV-cached generate(), padding masks, save_pretrained/from_pretrained, gradient checkpointing.

This file is copied next to config.json on save_pretrained (trust_remote_code loading), so it imports only
torch, transformers and its sibling configuration file.

    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    out = model(input_ids, labels=input_ids)  # out.loss, out.logits
"""

import inspect
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_nanogpt import NanoGPTConfig

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, both as the argument generate() passes to
# forward and as the field of model outputs. Ask this install's own output class which name it uses, so that we
# return the field it reads (the old name logs a deprecation warning on 5.24) on every version in our range.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# dense bf16 peak FLOP/s from the vendors' data sheets, matched against torch.cuda.get_device_name();
# more specific names first ("H100 PCIe" before "H100")
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where we don't know it (CPU, MPS, unknown GPUs)."""
    device = torch.device(device)
    return peak_flops_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_for_name(name: str) -> float | None:
    """e.g. "NVIDIA H100 80GB HBM3" -> 989e12; None for names not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def fused_adamw_available(device_type) -> bool:
    """Whether torch has the fused (single-kernel) AdamW for this device type: CUDA, and CPU since torch 2.4."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: fused AdamW exists for CUDA only
        return device_type == "cuda"


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.): a geometric sequence, interleaved when n_head is not a power of 2."""
    def pow2_slopes(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = pow2_slopes(closest) + pow2_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_GELU_K, _GELU_A = math.sqrt(2 / math.pi), 0.044715


class _SigmoidTanhGELU(torch.autograd.Function):
    """GPT-2's tanh GELU computed as x * sigmoid(2z), z = K (x + A x^3): the same function, since
    0.5 (1 + tanh(z)) == sigmoid(2z). Why: torch's CPU tanh kernel is slow. At the baby shape (12x64x512) on a
    2-core EPYC this takes 0.76 ms forward+backward, against 1.6 ms for F.gelu(approximate="tanh") and 0.6 ms
    for the exact GELU (medians; docs/performance.md has the history)."""

    @staticmethod
    def forward(ctx, x):
        # 2z = x (2K + 2KA x^2); few passes over memory: one fused multiply-add, then in place
        s = torch.addcmul(x.new_tensor(2 * _GELU_K), x, x, value=2 * _GELU_K * _GELU_A).mul_(x).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        # d/dx [x s] = s + s (1 - s) d,  d = x d(2z)/dx = x (2K + 6KA x^2);  written s + s (d - d s),
        # in place in one new tensor (out= may alias an input of the same layout)
        d = torch.addcmul(x.new_tensor(2 * _GELU_K), x, x, value=6 * _GELU_K * _GELU_A).mul_(x)
        d.addcmul_(d, s, value=-1)
        return torch.addcmul(s, d, s, out=d).mul_(grad)


class TanhGELU(nn.Module):
    """GPT-2's "gelu_new". float32 on CPU: the sigmoid form above; elsewhere (CUDA, bf16, torch.compile) torch's
    own fused kernel, which is the fast one there. Tiny inputs (one token of generation) also take torch's
    kernel: below ~16K elements the Python autograd.Function call (~15 us) costs more than it saves."""

    def forward(self, x):
        # is_compiling() first: a size test that dynamo sees would become a guard, and a recompile when B changes
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() >= 16384):
            return _SigmoidTanhGELU.apply(x)
        return F.gelu(x, approximate="tanh")


# -----------------------------------------------------------------------------
# the transformer: attention, MLP, block

def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scaling + mask) v written out, the path that returns the weights. q (B, nh, T, hs), k/v (B, nh,
    S, hs), mask: additive (B|1, nh|1, T, S) or None for causal -> (B, T, nh, hs), weights (B, nh, T, S)."""
    T = query.size(-2)
    att = (query @ key.transpose(-2, -1)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        att = att + attention_mask
    elif T > 1:  # top-left aligned like sdpa's is_causal (no mask only without a past, see _attention_bias)
        future = torch.ones(T, key.size(-2), dtype=torch.bool, device=query.device).triu(1)
        att = att.masked_fill(future, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), dropout, module.training)
    return (att @ value).transpose(1, 2).contiguous(), att  # (B, nh, T, S) x (B, nh, S, hs) -> (B, T, nh, hs)


# the implementations that add our bias; others (vLLM's paged attention, flash kernels) are handed it but may drop it:
# harmless for the causal mask, which they apply themselves, wrong for ALiBi's distance bias
BIAS_IMPLEMENTATIONS = ("eager", "sdpa")


def check_attention(model, attn_kwargs=None):
    """Refuse ALiBi under an implementation that drops its bias; keywords beyond forward's own go to the attention
    implementation, and eager/sdpa take none: there a misspelt name is an error, not silently ignored."""
    impl = model.config._attn_implementation
    if model.config.position_embedding == "alibi" and impl not in (None, *BIAS_IMPLEMENTATIONS):
        raise ValueError(f"ALiBi positions are a bias added inside attention, which only eager and sdpa receive; "
                         f"{impl!r} would drop it (wrong outputs): run this model with transformers or ONNX, or "
                         "train with position_embedding='rope' to serve it with vLLM")
    if attn_kwargs and impl in BIAS_IMPLEMENTATIONS:
        name = next(iter(attn_kwargs))
        raise TypeError(f"{type(model).__name__}.forward() got an unexpected keyword argument {name!r}")


class CausalSelfAttention(nn.Module):
    is_causal = True  # read by transformers' sdpa function and by engines that serve through the interface

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.scaling = config.head_dim ** -0.5  # an attribute: vLLM reads the scale from `scaling=self.scaling`
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True  # scaled init, see _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_bias, rope, cache, output_attentions=False, **kwargs):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, hs) each
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs): cached + new
        # one call through transformers' attention interface, the function picked by config._attn_implementation
        # ("sdpa", "eager": ours above, "vllm": the engine's paged attention); only eager returns the weights
        impl = "eager" if output_attentions else self.config._attn_implementation
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        y, att = attention_interface(self, q, k, v, attn_bias, dropout=self.dropout if self.training else 0.0,
                                     scaling=self.scaling, **kwargs)
        y = y.reshape(B, T, C)  # (B, T, nh, hs) -> all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), att


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation ("gelu_new"); nanoGPT's own model.py uses the exact erf GELU
        self.gelu = TanhGELU() if config.activation_function == "gelu_new" else nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(GradientCheckpointingLayer):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_bias=None, rope=None, cache=None, output_attentions=False, **kwargs):
        y, att = self.attn(self.ln_1(x), attn_bias, rope, cache, output_attentions, **kwargs)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, att  # att: (B, nh, T, S) attention weights, or None unless asked for


# -----------------------------------------------------------------------------
# the HF models

def _one_cache(cache, past_key_values):
    """The KV cache under either of its names: `cache` (transformers >= 5.24) or `past_key_values` (before)."""
    if cache is not None and past_key_values is not None:
        raise TypeError("pass the KV cache as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_NAME == "cache":  # as transformers' own models do on >= 5.24
        warnings.warn("`past_key_values` is deprecated since transformers 5.24: use `cache` instead", FutureWarning,
                      stacklevel=3)
    return past_key_values if cache is None else cache


class NanoGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    # attention goes through transformers' ALL_ATTENTION_FUNCTIONS with the caller's kwargs: engines that plug their
    # own attention in there (vLLM's Transformers backend) can serve the model
    _supports_attention_backend = True
    # no data-dependent Python branch in forward (a static cache's length stays a tensor): generate() may compile
    # the decoding step with fullgraph=True (on CUDA by itself with cache_implementation="static")
    _can_compile_fullgraph = True
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$"]  # causal-mask buffers of old nanoGPT checkpoints

    @torch.no_grad()
    def _init_weights(self, module):
        # nanoGPT/GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), zero biases
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class NanoGPTModel(NanoGPTPreTrainedModel):

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        check_attention(self)  # e.g. vLLM builds us with "vllm": refuse ALiBi at load, not at the first request
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                past_key_values=None, **attn_kwargs):
        """cache: a transformers Cache (past_key_values is its name before transformers 5.24). output_hidden_states:
        n_layer + 1 states as GPT-2 gives them (the embeddings, each block's input, and the last one after ln_f).
        position_ids (B, T): every position kind comes from it, e.g. for sequences flattened into one row as vLLM runs
        them. attn_kwargs: for the attention implementation (eager and sdpa take none: there a name is a TypeError)."""
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cfg = self.config
        check_attention(self, attn_kwargs)
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        if use_cache is None:  # a cache only helps generation; in training it would just hold on to k, v
            use_cache = cfg.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        # a static (fixed-size) cache hands attention all its max_cache_len slots, the mask hides the unused tail;
        # it keeps its length in a tensor, and past_len stays one: no host sync, no Python branch on its value, so
        # one compiled graph serves every decoding step
        static = cache is not None and cache.is_compileable
        past_len = cache.get_seq_length() if cache is not None else 0
        S = past_len + T  # keys/values the new tokens attend to (a 0-d tensor with a static cache)
        K = cache.layers[0].max_cache_len if static else S
        pe, longest = cfg.position_embedding, S  # longest: the longest sequence, for the learned table's check
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # left padding: real tokens start at position 0, exactly as without padding (with a static cache
                # the mask covers exactly the past and the new tokens: no slicing by a tensor length)
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, -T:] if static else positions[:, past_len:S]
            else:
                position_ids = (torch.arange(T, device=x.device) + past_len).unsqueeze(0)  # (1, T)
        elif pe == "learned" and position_ids.numel() and not torch.compiler.is_compiling():
            longest = int(position_ids.max()) + 1  # a flattened batch (vLLM) is longer than any of its sequences
        if pe == "learned":
            # (checked on the host, so not inside a compiled graph: there an out-of-range position fails in wpe)
            if not torch.compiler.is_compiling() and longest > cfg.block_size:
                raise ValueError(
                    f"sequence length {int(longest)} exceeds block_size {cfg.block_size}, the length of this model's "
                    "learned position table: crop the input to the last block_size tokens "
                    "(or train with position_embedding='alibi' or 'rope', which extrapolate)"
                )
            x = x + self.wpe(position_ids)
        rope = self._rope(position_ids, x.dtype) if pe == "rope" else None
        attn_bias = self._attention_bias(attention_mask, T, past_len, K, static, x.dtype, x.device)

        x = self.drop(x)
        hidden_states = () if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                hidden_states += (x,)
            x, att = block(x, attn_bias=attn_bias, rope=rope, cache=cache, output_attentions=output_attentions,
                           position_ids=position_ids, **attn_kwargs)
            if output_attentions:
                attentions += (att,)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden_states += (x,)
        out = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states, attentions=attentions,
                                      **{CACHE_NAME: cache if use_cache else None})
        return out if return_dict else out.to_tuple()

    def _rope(self, position_ids, dtype):
        """cos/sin tables for rotary embeddings at the given positions, computed on the fly (no stale buffers)."""
        hs = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hs, 2, device=position_ids.device).float() / hs))
        freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _attention_bias(self, attention_mask, T, past_len, K, static, dtype, device):
        """Additive attention bias (B|1, nh|1, T, K) over K keys, or None for plain causal attention (the flash path).

        Needed for ALiBi, for padding (attention_mask with zeros), for several new tokens after a cache, and for a
        static cache (K slots, of which past_len + T are filled: the rest must be masked). past_len is a 0-d tensor
        with a static cache: everything below is tensor arithmetic on it, so a compiled step does not specialize.
        """
        alibi = self.config.position_embedding == "alibi"
        q_pos = torch.arange(T, device=device) + past_len  # the new tokens' positions
        if attention_mask is not None and attention_mask.ndim == 4:  # already 4-D (e.g. static-cache generate)
            allowed = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
        else:
            # any 2-D mask is applied as given: looking at its values (e.g. "all ones, so skip it") would be a
            # data-dependent branch that breaks torch.compile fullgraph and torch.export; without a mask, plain
            # causal attention takes the fused is_causal path
            padded = attention_mask is not None
            if not (static or alibi or padded or (past_len > 0 and T > 1)):
                return None  # no mask at all needed (T == 1 after a cache attends to everything)
            allowed = (torch.arange(K, device=device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, K) causal
            if padded:  # the mask covers the keys so far (a longer one is cut); keys past them are masked by causality
                keys = attention_mask[:, :K].bool()
                allowed = allowed & F.pad(keys, (0, K - keys.size(-1)))[:, None, None, :]  # (B, 1, T, K)
        bias = torch.zeros(allowed.shape, device=device)
        if alibi:
            K = allowed.shape[-1]
            distance = (q_pos[:, None] - torch.arange(K, device=device)[None, :]).clamp(min=0)  # (T, K)
            bias = bias - alibi_slopes(self.config.n_head).to(device)[None, :, None, None] * distance  # (.., nh, T, K)
        # the dtype's min rather than -inf: fully masked rows (left-pad queries) give uniform weights, not NaN
        return bias.masked_fill(~allowed, torch.finfo(dtype).min).to(dtype)


class NanoGPTForCausalLM(NanoGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = NanoGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, past_key_values=None, **kwargs):
        """labels: like input_ids (shifted inside, -100 ignored). logits_to_keep=k: logits of the last k positions.

        kwargs: transformers' loss keywords, and the attention implementation's keywords (passed down to it; under
        eager/sdpa, which take none, anything else is a TypeError, not silently dropped):
          shift_labels: targets already shifted, as nanoGPT's (x, y) batches are, so no position is wasted (and what
            Trainer hands over under sequence/context parallelism). Not a named parameter: Trainer takes every named
            forward parameter containing "label" for a label column, and evaluate() then reports no eval_loss.
          num_items_in_batch: the loss is summed and divided by it (Trainer's exact loss under gradient accumulation).
        The cache is taken under both its names (`cache` since transformers 5.24)."""
        shift_labels, num_items = kwargs.pop("shift_labels", None), kwargs.pop("num_items_in_batch", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        check_attention(self, kwargs)
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        x = out.last_hidden_state  # (B, T, C)
        loss = None
        if labels is not None or shift_labels is not None:
            logits = self.lm_head(x)  # (B, T, V)
            if shift_labels is None:  # position t predicts token t+1; the last position has no target
                shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100, reduction="mean" if num_items is None else "sum")
            if num_items is not None:
                loss = loss / num_items
        else:
            # inference-time mini-optimization (nanoGPT): only forward the lm_head on the positions asked for
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(x[:, keep, :])
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions, **{CACHE_NAME: getattr(out, CACHE_NAME)})
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        # (inputs_embeds named: generate() looks for it in this signature)
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        # transformers < 5.24 also passes cache_position; positions here come from the cache's length instead
        inputs.pop("cache_position", None)
        block = self.config.block_size
        if self.config.position_embedding == "learned" and input_ids.size(1) > block:
            # nanoGPT's crop: learned positions end at block_size, so past it each new token is computed from the last
            # block_size tokens, from scratch (every cached key/value sits at a position that has shifted by one)
            mask = kwargs.get("attention_mask")  # 2-D (B, S) in generate(); None: no padding
            inputs.update(input_ids=input_ids[:, -block:], attention_mask=None if mask is None else mask[:, -block:])
            inputs.pop("position_ids", None)  # recomputed from the cropped mask: the window starts at position 0
            for key in ("cache", "past_key_values"):
                if inputs.get(key) is not None:
                    inputs[key] = DynamicCache(config=self.config)  # static or dynamic, the old one is stale
        return inputs

    def save_pretrained(self, save_directory, *args, **kwargs):
        # auto_map gets AutoModel too (transformers writes only the saved class): vLLM's Transformers backend loads
        # the base model with it
        if self._auto_class is not None:
            model = f"{type(self).__module__.rsplit('.', 1)[-1]}.NanoGPTModel"
            self.config.auto_map = dict(getattr(self.config, "auto_map", None) or {}) | {"AutoModel": model}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -------------------------------------------------------------------------
    # nanoGPT's helpers

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops the position table (token embeddings count: they are the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position_embedding == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def crop_block_size(self, block_size):
        """Model surgery to a smaller context, e.g. GPT-2's 1024 down to 256 for a small finetune."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: {block_size} must be in 1..{self.config.block_size}")
        self.config.block_size = block_size
        if self.config.position_embedding == "learned":
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
            self.transformer.wpe.num_embeddings = block_size

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, verbose=True, params=None):
        """AdamW with decay on >=2-D tensors (matmuls, embeddings) only; fused kernel where the device has one.
        params: the tensors to optimize (default: every trainable one; Muon's split passes the non-matrix rest)."""
        params = [p for p in (self.parameters() if params is None else params) if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if verbose:
            print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
            print(f"num non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        # one fused kernel for the whole update instead of a loop over tensors: CUDA, and CPU since torch 2.4 (~4x
        # faster optimizer step at the CPU baby shape)
        fused = fused_adamw_available(device_type)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """Model FLOPs utilization vs the device's bf16 peak (PaLM appendix B); None where the peak is unknown."""
        peak = peak_flops(self.device)
        if peak is None:
            return None
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak

    # -------------------------------------------------------------------------
    # interop: GPT-2 (transformers) and original nanoGPT checkpoints

    # GPT-2 stores these as Conv1D (in, out); we use nn.Linear (out, in), so they are transposed
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_gpt2(cls, gpt2="gpt2", **config_overrides):
        """From a GPT2LMHeadModel, a local dir or a Hub id ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", ...)."""
        if not isinstance(gpt2, GPT2LMHeadModel):
            gpt2 = GPT2LMHeadModel.from_pretrained(gpt2)
        g = gpt2.config
        if g.activation_function not in ("gelu_new", "gelu"):
            raise ValueError(f"from_gpt2: unsupported activation_function {g.activation_function!r}")
        config = NanoGPTConfig(vocab_size=g.vocab_size, block_size=g.n_positions, n_layer=g.n_layer, n_head=g.n_head,
                               n_embd=g.n_embd, bias=True, activation_function=g.activation_function,
                               layer_norm_epsilon=g.layer_norm_epsilon, bos_token_id=g.bos_token_id,
                               eos_token_id=g.eos_token_id, **config_overrides)
        model = cls(config)
        sd = {k: v.t() if k.endswith(cls._CONV1D) else v for k, v in gpt2.state_dict().items() if not k.endswith(".attn.bias")}
        model._load_exact(sd)
        return model

    def to_gpt2(self) -> GPT2LMHeadModel:
        """A vanilla GPT2LMHeadModel with identical logits (learned positions), for people who won't run remote code
        and for engines that serve GPT-2 natively (vLLM; llama.cpp through its converter, which reads n_ctx)."""
        c = self.config
        if c.position_embedding != "learned":
            raise ValueError(f"to_gpt2: GPT-2 has learned positions; this model uses {c.position_embedding!r}")
        gpt2 = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
            n_embd=c.n_embd, activation_function=c.activation_function, layer_norm_epsilon=c.layer_norm_epsilon,
            tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout))
        ours = self.state_dict()
        sd = {}
        for k, v in gpt2.state_dict().items():
            if k in ours:
                sd[k] = ours[k].t() if k.endswith(self._CONV1D) else ours[k]
            elif k.endswith(".bias"):  # bias=False: GPT-2 always has biases; zeros are the same function
                sd[k] = torch.zeros_like(v)
        gpt2.load_state_dict(sd, strict=False)
        return gpt2.to(self.device, self.dtype)

    @classmethod
    def from_nanogpt_checkpoint(cls, path, **config_overrides):
        """Import an original nanoGPT ckpt.pt ({"model_args": ..., "model": state_dict, ...}) safely."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path}: not a nanoGPT checkpoint (expected keys 'model_args' and 'model')")
        args = {k: ckpt["model_args"][k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")}
        # nanoGPT's MLP uses the exact GELU; keep it so logits match nanoGPT's own model
        config = NanoGPTConfig(**{**args, "dropout": float(ckpt["model_args"].get("dropout", 0.0)),
                                  "activation_function": "gelu", **config_overrides})  # overrides win (dropout)
        model = cls(config)
        # `_orig_mod.` is what saving a torch.compile'd module adds to every key
        sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items() if not k.endswith(".attn.bias")}
        model._load_exact(sd)
        return model

    def _load_exact(self, sd):
        """load_state_dict that insists every tensor is there with the right shape (nanoGPT's asserts)."""
        ours = self.state_dict()
        missing = sorted(set(ours) - set(sd) - {"lm_head.weight"})
        unexpected = sorted(set(sd) - set(ours))
        bad = [k for k in sd if k in ours and sd[k].shape != ours[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"weights don't fit this architecture: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, wrong shape {[(k, tuple(sd[k].shape)) for k in bad[:5]]}")
        self.load_state_dict(sd, strict=False)
        self.tie_weights()

    def init_embeddings_from(self, source, freeze=False):
        """Initialise the token embeddings (and so the tied head) from a GPT-2 model / dir / Hub id or a
        (vocab, n_embd) tensor, as the seed fork's pre-trained embeddings option; optionally frozen."""
        if not torch.is_tensor(source):
            gpt2 = source if isinstance(source, PreTrainedModel) else GPT2LMHeadModel.from_pretrained(source)
            source = gpt2.get_input_embeddings().weight
        wte = self.transformer.wte.weight
        if source.dim() != 2 or source.size(1) != wte.size(1):
            raise ValueError(f"init_embeddings_from: embeddings of shape {tuple(source.shape)} don't fit "
                             f"n_embd={wte.size(1)}")
        n = min(source.size(0), wte.size(0))  # e.g. GPT-2's 50257 rows into a table padded to 50304
        with torch.no_grad():
            wte[:n].copy_(source[:n])
        wte.requires_grad_(not freeze)


__all__ = ["NanoGPTModel", "NanoGPTForCausalLM", "NanoGPTPreTrainedModel", "peak_flops", "peak_flops_for_name"]
