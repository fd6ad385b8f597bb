"""Cached generation is exact: for every position embedding and every way transformers drives the cache, the logits
generate() saw at each step equal a full no-cache forward of the same sequence.

Logits, not greedy tokens: a tiny random model has near-tied tokens, so a broken cache can still pick the same
ones by luck (it did: the alibi/rope token tests passed while their cached logits were off by 1-5)."""

import logging
import warnings

import pytest
import torch
from test_modeling import POSITIONS, tiny

from nanogpt_hf.modeling_nanogpt import CACHE_NAME

TOL = 1e-4


def full_logits(m, seq, attention_mask=None):
    with torch.no_grad():
        return m(seq, attention_mask=attention_mask, use_cache=False).logits


def max_step_diff(step_logits, full, prompt_len):
    """step_logits[i] (B, V) were computed for the token at prompt_len + i, i.e. from position prompt_len + i - 1."""
    return max((full[:, prompt_len + i - 1] - s).abs().max().item() for i, s in enumerate(step_logits))


def gen(m, ids, **kw):
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True) | kw
    return m.generate(ids, **kw)


@pytest.fixture(params=POSITIONS)
def model(request):
    return tiny(position_embedding=request.param)


@pytest.mark.parametrize("mode", ["greedy", "sample", "static"])
def test_each_step_matches_full_forward(model, mode):
    prompt = torch.randint(0, 67, (2, 5))
    kw = {"greedy": {}, "sample": dict(do_sample=True, temperature=0.9, top_k=20),
          "static": dict(cache_implementation="static")}[mode]
    torch.manual_seed(1)
    out = gen(model, prompt, **kw)
    assert out.sequences.shape == (2, 17) and len(out.logits) == 12
    assert max_step_diff(out.logits, full_logits(model, out.sequences), 5) <= TOL


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_left_padded_batch_matches_unpadded_rows(model, impl):
    model.set_attn_implementation(impl)
    rows = [torch.randint(1, 67, (1, n)) for n in (7, 3, 5)]
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:] = r
        mask[i, width - r.shape[1]:] = 1
    out = gen(model, ids, attention_mask=mask)
    for i, r in enumerate(rows):
        # each row, with its padding removed, run alone and without a cache: padding changes nothing
        seq = out.sequences[i:i + 1, width - r.shape[1]:]
        steps = [s[i:i + 1] for s in out.logits]
        assert max_step_diff(steps, full_logits(model, seq), r.shape[1]) <= TOL


def test_beam_search_scores_match_full_forward(model):
    prompt = torch.randint(0, 67, (2, 4))
    # length_penalty 0: a beam's score is the plain sum of its tokens' log-probabilities
    out = gen(model, prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3, length_penalty=0.0,
              output_scores=True)
    seq = out.sequences  # (2 * 3, 12)
    logp = full_logits(model, seq)[:, 3:-1].log_softmax(-1).gather(-1, seq[:, 4:, None]).squeeze(-1)  # (6, 8)
    assert (logp.sum(-1) - out.sequences_scores).abs().max().item() <= TOL


def test_continue_from_returned_cache(model):
    prompt = torch.randint(0, 67, (1, 4))
    first = gen(model, prompt, max_new_tokens=6)
    cache = getattr(first, CACHE_NAME)
    assert cache is not None and cache.get_seq_length() == 9  # the last token is not in the cache yet
    more = torch.randint(0, 67, (1, 3))
    ids = torch.cat([first.sequences, more], dim=1)
    second = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True, **{CACHE_NAME: cache})
    assert max_step_diff(second.logits, full_logits(model, second.sequences), ids.shape[1]) <= TOL


def test_inputs_embeds(model):
    prompt = torch.randint(0, 67, (2, 5))
    embeds = model.transformer.wte(prompt).detach()
    out = gen(model, None, inputs_embeds=embeds)
    new = out.sequences[:, -12:]  # with inputs_embeds, only the new tokens come back
    with torch.no_grad():
        full = model(inputs_embeds=torch.cat([embeds, model.transformer.wte(new)], dim=1), use_cache=False).logits
    assert max_step_diff(out.logits, full, 5) <= TOL


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_generate_logs_no_deprecation_warning():
    from transformers.utils import logging as hf_logging
    hf_logging.warning_once.cache_clear()  # "once" per process: an earlier test may have logged it already
    records = Records()
    hf_logging.get_logger().addHandler(records)  # transformers' root logger, where every module's records arrive
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = tiny()
            out = gen(m, torch.randint(0, 67, (1, 4)), max_new_tokens=4)
            getattr(out, CACHE_NAME)
            m.generate(torch.randint(0, 67, (2, 4)), attention_mask=torch.ones(2, 4, dtype=torch.long),
                       max_new_tokens=3, num_beams=2, pad_token_id=0)
    finally:
        hf_logging.get_logger().removeHandler(records)
    assert not [m for m in records.messages if "deprecat" in m.lower()], records.messages
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


def test_unknown_forward_arguments_raise():
    m = tiny()
    x = torch.randint(0, 67, (1, 4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'cache_params'"):
        m(x, cache_params=None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        m.transformer(x, foo=1)
    cache = getattr(m(x, use_cache=True), CACHE_NAME)
    with pytest.raises(TypeError, match="not both"):
        m(x, cache=cache, past_key_values=cache)


def test_both_cache_names_are_accepted():
    m = tiny()
    x = torch.randint(0, 67, (1, 6))
    ref = full_logits(m, x)[:, -1]
    for name in ("cache", "past_key_values"):
        prefix = m(x[:, :5], use_cache=True)
        # the old name warns where transformers itself deprecated it (>= 5.24), as its own models do
        old_name = name == "past_key_values" and CACHE_NAME == "cache"
        with pytest.warns(FutureWarning, match="use `cache`") if old_name else warnings.catch_warnings():
            if not old_name:
                warnings.simplefilter("error")
            out = m(x[:, 5:], **{name: getattr(prefix, CACHE_NAME)})
        assert (out.logits[:, -1] - ref).abs().max().item() <= TOL, name


# -----------------------------------------------------------------------------
# past block_size: learned positions end there, so generate() crops the context as nanoGPT's generate does

def cropped_greedy(m, ids, n):
    """nanoGPT's loop: each token from the last block_size tokens, no cache. ids (1, T) -> (1, T + n), step logits."""
    steps = []
    with torch.no_grad():
        for _ in range(n):
            logits = m(ids[:, -m.config.block_size:], use_cache=False).logits[:, -1]
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, steps


@pytest.mark.parametrize("mode", ["dynamic", "static", "no cache"])
def test_learned_positions_generate_past_block_size_as_nanogpt_crops(mode):
    m = tiny(block_size=16)
    prompt = torch.randint(0, 67, (1, 5))
    kw = {"dynamic": {}, "static": dict(cache_implementation="static"), "no cache": dict(use_cache=False)}[mode]
    out = gen(m, prompt, max_new_tokens=40, **kw)  # 45 tokens through a 16-position table
    ref, steps = cropped_greedy(m, prompt, 40)
    assert out.sequences.tolist() == ref.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, steps, strict=True)) <= TOL


def test_left_padded_batch_past_block_size_matches_each_row_alone():
    m = tiny(block_size=16)
    rows = [torch.randint(1, 67, (1, n)) for n in (9, 3)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 9 - r.shape[1]:], mask[i, 9 - r.shape[1]:] = r, 1
    out = gen(m, ids, attention_mask=mask, max_new_tokens=20)
    for i, r in enumerate(rows):
        ref, steps = cropped_greedy(m, r, 20)
        assert out.sequences[i, 9 - r.shape[1]:].tolist() == ref[0].tolist()
        assert max((a[i] - b[0]).abs().max().item() for a, b in zip(out.logits, steps)) <= TOL


def test_pipeline_generates_100_tokens_from_a_block_size_64_model(tmp_path):
    from transformers import pipeline

    from nanogpt_hf.tokenization import build_char_tokenizer
    tokenizer = build_char_tokenizer("First Citizen:\nBefore we proceed any further, hear me speak.\n", eot=None)
    m = tiny(vocab_size=len(tokenizer), block_size=64)
    m.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = pipeline("text-generation", model=str(tmp_path))("Before we", max_new_tokens=100, do_sample=False)
    ref, _ = cropped_greedy(m, torch.tensor([tokenizer("Before we")["input_ids"]]), 100)
    assert text[0]["generated_text"] == tokenizer.decode(ref[0]) and len(ref[0]) == 9 + 100
