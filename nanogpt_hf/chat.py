"""
Conversations: the chat special tokens, the Jinja chat template saved with the tokenizer, rendering a conversation
to token ids + the loss mask that SFT trains on, and growing a pretrained model's embeddings for the new tokens.

    tok = add_chat_tokens(tokenizer)                      # + <|system|> <|user|> <|assistant|> <|end|>, chat_template
    ids, mask = render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    tok.apply_chat_template(messages, add_generation_prompt=True)   # the same ids, then <|assistant|>

A conversation renders as <|role|>content<|end|> per message, nothing in between (no whitespace to get wrong in
char-level models). The mask is 1 on what the model must learn to say: the content of every assistant turn and its
<|end|> (so it learns to stop); 0 on the role headers, system and user turns. The template lives in the tokenizer
(tokenizer_config.json / chat_template.jinja), so any transformers code can use it without this package.
"""

import torch

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = [f"<|{r}|>" for r in ROLES] + [END]
# one message: <|role|>content<|end|>; an unknown role is an error, not a silently different prompt. The
# {% generation %} block marks what the assistant says: apply_chat_template(return_assistant_tokens_mask=True) gives
# render()'s mask, which is what TRL's assistant_only_loss trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': expected system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] ~ '<|end|>' }}{% endgeneration %}"
    "{%- else -%}{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def has_chat_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in CHAT_TOKENS)


def add_chat_tokens(tokenizer):
    """Add the chat special tokens (new ids after the existing ones, in CHAT_TOKENS order; kept if already there)
    and the chat template to a tokenizer, in place; returns it."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)  # special: split first, skipped by decode(skip_special_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def end_token_id(tokenizer):
    return tokenizer.convert_tokens_to_ids(END)


def turn_token_in(text):
    """The first chat token (<|user|>, <|end|>, ...) written literally in text, or None."""
    return next((t for t in CHAT_TOKENS if t in text), None)


def check_messages(messages, where="row"):
    """A ValueError naming `where` for a conversation that is not [{role, content}, ...] with known roles, non-empty
    string contents free of chat tokens, and at least one assistant turn (else it has nothing to train on)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or m["role"] is None:
            raise ValueError(f"{where}: message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}: message {i} ({m['role']}) has empty or missing 'content'")
        if turn_token_in(content):  # the tokenizer would read it as a turn boundary: fake turns, a wrong loss mask
            raise ValueError(f"{where}: message {i} ({m['role']}) contains the chat token {turn_token_in(content)!r}, "
                             "which would split the turn and mislabel the loss mask; remove it from the data")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message (nothing to train on)")


def render(tokenizer, messages):
    """A conversation -> (ids, mask), two lists of equal length: the chat template's tokens, and 1 where the token
    is one the model should learn to produce (assistant content and its <|end|>). The pieces are encoded one by
    one; special tokens split text the same way inside the tokenizer, so this equals apply_chat_template's ids."""
    return assemble(tokenizer, messages, [tokenizer(m["content"], add_special_tokens=False)["input_ids"]
                                          for m in messages])


def assemble(tokenizer, messages, bodies):
    """render() with each message's content already tokenized (bodies: one id list per message; chat_data encodes
    a whole batch's contents in one call): the turn tokens around each, and the mask."""
    ids, mask, end = [], [], end_token_id(tokenizer)
    for m, body in zip(messages, bodies):
        learn = int(m["role"] == "assistant")
        ids += [tokenizer.convert_tokens_to_ids(f"<|{m['role']}|>"), *body, end]
        mask += [0] + [learn] * (len(body) + 1)
    return ids, mask


def resize_embeddings(model, vocab_size):
    """Grow model's (tied) token embeddings to vocab_size rows; the new rows are the mean of the old ones (a new
    token starts as an 'average' token, not as noise whose logits would dominate the softmax). Returns the number
    of rows added (0: nothing to do)."""
    old = model.get_input_embeddings().weight
    added = vocab_size - old.shape[0]
    if added <= 0:
        return 0
    with torch.no_grad():
        mean = old.mean(dim=0, keepdim=True)  # (1, C)
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        model.get_input_embeddings().weight[-added:] = mean
    model.tie_weights()
    return added


def extends(base, tokenizer):
    """True if tokenizer is base plus (some of) the chat tokens: the same ids for every token base has."""
    theirs, ours = base.get_vocab(), tokenizer.get_vocab()
    extra = set(ours) - set(theirs)
    return extra <= set(CHAT_TOKENS) and all(ours.get(t) == i for t, i in theirs.items())
