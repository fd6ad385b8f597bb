"""prepare through datasets' .map: the same bytes as the writer it replaced, and its cache reused on a re-run.

    python -m pytest tests/test_prepare_map.py -q
"""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_text


def golden_inputs(root):
    """The inputs of the byte-identity cases, generated here (no download): one text for char level, one longer
    text for GPT-2 BPE (cut into several rows), and a corpus of 9 files, one of them longer than a row."""
    root = Path(root)
    (root / "char.txt").write_text(make_text(50_000, seed=21) + "  \t\n\n   end\n", encoding="utf-8")
    (root / "gpt2.txt").write_text(make_text(150_000, seed=22) + " 'll  \n\n\t x 12345 😀\n", encoding="utf-8")
    (root / "corpus").mkdir(exist_ok=True)
    for i in range(8):
        (root / "corpus" / f"doc{i}.txt").write_text(make_text(500 + 900 * i, seed=30 + i), encoding="utf-8")
    (root / "corpus" / "doc8.txt").write_text(make_text(70_000, seed=40), encoding="utf-8")
    word_level_tokenizer().save_pretrained(root / "hf_words")
    return root


def word_level_tokenizer():
    """A small Hugging Face tokenizer built, not trained (the same ids with any tokenizers version): conftest's
    words and names, punctuation, <unk>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import NAMES, WORDS

    words = sorted(set(WORDS + [w.capitalize() for w in WORDS] + " ".join(NAMES).split()) | set(".,!?;:'—"))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["<unk>", "<eos>"])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


# name -> prepare_dataset arguments (paths relative to golden_inputs' root; "HF": word_level_tokenizer's folder)
GOLDEN_CASES = {
    "char": dict(inputs=["char.txt"], tokenizer="char", shard_size=4096),
    "gpt2": dict(inputs=["gpt2.txt"], tokenizer="gpt2", shard_size=8192, num_proc=2),
    "corpus_gpt2": dict(inputs=["corpus/*.txt"], tokenizer="gpt2", shard_size=3000, val_fraction=0.2, num_proc=2),
    "corpus_llmc": dict(inputs=["corpus/*.txt"], tokenizer="gpt2", shard_size=3000, val_fraction=0.2, format="llmc"),
    "corpus_hf": dict(inputs=["corpus/*.txt"], tokenizer="HF", shard_size=3000, val_fraction=0.2),
}


def golden_args(root, name):
    args = dict(GOLDEN_CASES[name])
    args["inputs"] = [str(Path(root) / p) for p in args["inputs"]]
    if args["tokenizer"] == "HF":
        args["tokenizer"] = str(Path(root) / "hf_words")
    return args


def digests(data_dir, root):
    """{file: sha256} of every shard, and of meta.json with the inputs' folder written as <root> and without
    tokenizer_class (the class name of the saved tokenizer, which varies with the transformers version) and
    tokenizer_hash (recorded since issue 24, after the golden digests)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text().replace(str(root), "<root>"))
    meta.pop("tokenizer_class")
    meta.pop("tokenizer_hash", None)
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir.glob("*.bin"))}
    out["meta.json"] = hashlib.sha256(json.dumps(meta, indent=2, ensure_ascii=False).encode()).hexdigest()
    return out


GOLDEN = {  # digests of the writer before .map (commit fa0f4f9), recorded by running it on golden_inputs
    'char': {
        'train_000.bin': 'fc1ce0b35736645d65ce55468720aa0878800381417e27fb2fa28074874f7c3a',
        'train_001.bin': '053e806bbc146d0fa9fc3e744b6bf166d22b2c7590cdeacb29eb471ae6a7eeb8',
        'train_002.bin': 'bdd7ba0b0986c06f0712265b97b5cf6258eaafffb5f58c990d28a7d0be602035',
        'train_003.bin': '1013e44755831929a800a801534520c94f4ed024c3cbb23c78ca38c1fe1bc1df',
        'train_004.bin': 'a57b54012f103d743155409382632d53bdd834eb137a70559fc4f8c9b6ac061e',
        'train_005.bin': '7ca369711e80fc7c2c54072c0bd33fb3683c02792b21758e92d13cbbc45e27f4',
        'train_006.bin': 'a1308d59ba4ae033aae3e5a1005804ab4cb442d50170c987bab1b2dca96cfd64',
        'train_007.bin': '51de009469949ebfa9cee86e39d8da158b37db3db0b9ab39dff451d69428fe0b',
        'train_008.bin': 'b7987707e8fd5dd2ac60191e40ebba024719a50401c17809439a5cb821aa8578',
        'train_009.bin': '23c85d96c27d8d421b057d7b4139e40dfd42ec48a099122ba99bdf0cc9d8d33b',
        'train_010.bin': '6a1b3571bf260b1c41d6b62a5a02b4a38530ea715fa614c41e344d81491fc33c',
        'train_011.bin': 'f761cae7ea63cd1c00d0a3173668e5d0cc9039ae96390c34046d3cfbd5fffe83',
        'val_000.bin': 'a4a8861ccb71a0fb41925a025d313fa3aa17b14d10eff70b8b5f72836a2f2b6c',
        'val_001.bin': '89139bb613b7eecbb55058477fa0b2b42b02a40f9a65a7ad7de0c9bcb286612b',
        'meta.json': '38508534b67c534d8e3c8397cfb14f72b9dce917a9eb0254a1973047a602bfde',
    },
    'gpt2': {
        'train_000.bin': '868a27a9a91884df36b8701f109a43ff2941f17a42f5a0e8a76727096e16fd16',
        'train_001.bin': 'daebe942aeb0b3097b5e4c8dc6b2b8c5b32a1ca9ac708aa3c97c0d6aa69315ba',
        'train_002.bin': 'f7d9e083a038c445417dd4a2360b8e6bb7b22d6bf6938e7cb0bdc96635c25b69',
        'train_003.bin': 'a572682e846f0dfb8991d03a850303bb4a5433e5f61980fd615d3dfb88c2aff9',
        'train_004.bin': 'e5b435f889b85e392d7c7c6be5b798be3d844cdb6805d535d54d10943b36cabb',
        'val_000.bin': '4cdbb4e360c9afa0963ea081f497ba403c95cdc3d071cf9346f6ec68ff429012',
        'meta.json': '4077353fc9ba24b2f1ddf822fa8544f13201d3a6b264e53c551e747ba3c69237',
    },
    'corpus_gpt2': {
        'train_000.bin': '1c49144522a03a9f5cb17f2f7501aa904a71e27b1ec8754b8363ff6819cbd7a6',
        'train_001.bin': 'a7c82d0d8f32bf15978330822d84663d0669349a61c70c4b57af88d9b3668c1e',
        'train_002.bin': '56b79c35412e5b527260090fe7f0a863bad32186bb0d281b20e377a810b444e1',
        'val_000.bin': '2dbdad3a8c991d892c3a3f886f59f8ad25291112f1eb9518f84f3007f2a5fde9',
        'val_001.bin': '22a584499c63f2859b3fa0f3cf2f085e3430564d84e25b381f720d4cb112fde4',
        'val_002.bin': '353f21443cbcee58058d4a57b189aab58d582e58a4ae0b7c654b2e4d46d085d4',
        'val_003.bin': 'f56e3eba865fd67c877ef255349892e1df70d6d03090f0f1ce008833d9404edc',
        'val_004.bin': 'b82f201270b80d65fd328ccb52476ab8bfbc82d46d3b6f07ac9c17aeaf01e8d6',
        'val_005.bin': '182aad37613dd182354b81aedd0b11a506a1d3ad32700902256a7b9358013735',
        'val_006.bin': '79a5875bbe814e4d1cf94aa537658b4d21360fd361e74a082d70564de6c74170',
        'meta.json': 'd68d4358b782a66e8af3258114543bee804256859ab1a0875482b906c6c60703',
    },
    'corpus_llmc': {
        'golden_corpus_llmc_train_000000.bin': '886b23edca248144af646f7d0b1be041cb72f67325ee0e549c661704549e3cdd',
        'golden_corpus_llmc_train_000001.bin': '40de0b74889dfa804a59a8f2b2d70eb28956a4d8a61f546a71745eadc955044d',
        'golden_corpus_llmc_train_000002.bin': '6ee7c3b61d72f6664f26d4bc8c2c940b3b039acd669bcd5877723cecfb93859f',
        'golden_corpus_llmc_val_000000.bin': 'fe2556e4042f24cee1d3e826829b3ca8a6852852452224f25ec487f3cb1e365f',
        'golden_corpus_llmc_val_000001.bin': 'dfb18fe314353b30c5cafa396610a52d0a301c69fd0ee5af9e5a8e0cc9a64398',
        'golden_corpus_llmc_val_000002.bin': 'c14a54709f57864be68499f4b969c8c762ae4a77482b0169c1cc5a5cf44299b5',
        'golden_corpus_llmc_val_000003.bin': 'b2a78e0450f8e6f62b050885d186f3527c2b723100494244adacdc7fab4020d9',
        'golden_corpus_llmc_val_000004.bin': '59d9f52700f556337b77f137192e0236347de1938ba477261b20d145d27d2ebf',
        'golden_corpus_llmc_val_000005.bin': 'e2ce4d313ecb3c4140c30d13c5b7b5b60503c09bfb98cc8a0395ca37478a1986',
        'golden_corpus_llmc_val_000006.bin': '5f27b2c3db6b669b98e90c7e231b629ee50d6d58d0535669c0005907c6b03e27',
        'meta.json': 'd06c6b982b653d28019ea1ff8682571fc11689f4056fa6ecde396e4669faebea',
    },
    'corpus_hf': {
        'train_000.bin': '5c1742d12060ede0322987425eb6274b17254da13c2a57b4dd40e14b9e285422',
        'train_001.bin': '3939c40272fd56ede5d0f8b142b03654d1ddbb712bf1bae4df5f46b9f9626af1',
        'val_000.bin': '913a837380330077169df74d175a9a7f40977615d949f0dbf3692decb25da381',
        'val_001.bin': 'f9221359ee48a306ed8331743ea5c32213ec3cf7d67584efe89ca6bfa79379d1',
        'val_002.bin': '4226f9cd2e3d3cb691f6ccd5768134efdb08dbc21a018d88e8c2a179376ccdde',
        'val_003.bin': 'b4e0b72c8b34320154df9764097b857cc7982a61b10da5823310a63847ca870a',
        'val_004.bin': '5bd2dabb27805eebddcafca61a03c2998b076b7137c2bab93fa9a22d682ea65b',
        'meta.json': '5c108fea2b040867b52a14312ec86f4c118c29fe70b736d2b600a2670f7afae7',
    },
}


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory, tiktoken_cache):
    return golden_inputs(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name, workers", [("char", True), ("gpt2", True), ("corpus_gpt2", False),
                                           ("corpus_llmc", True), ("corpus_hf", False)])
def test_shards_are_the_bytes_of_the_writer_before_map(golden_root, tmp_path, monkeypatch, name, workers):
    """The .map path writes the same shards and meta.json as the hand-written writer it replaced; workers: the
    .map runs on 2 processes (small inputs, and HF tokenizers, are otherwise mapped in process)."""
    import nanogpt_hf.prepare as prepare

    if workers:
        monkeypatch.setattr(prepare, "IN_PROCESS_BYTES", 0)
    prepare.prepare_dataset("golden_" + name, data_dir=tmp_path / "d", **golden_args(golden_root, name) | dict(
        num_proc=2 if workers else None))
    assert digests(tmp_path / "d", golden_root) == GOLDEN[name]


def test_interrupted_on_workers_resumes_to_the_same_bytes(golden_root, tmp_path, monkeypatch):
    """Killed after 3 shards of a 2-process .map (its cache files: one per process), the re-run reads the
    tokens back from the cache, keeps the 3 shards and writes the rest: the recorded bytes."""
    import nanogpt_hf.prepare as prepare

    monkeypatch.setattr(prepare, "IN_PROCESS_BYTES", 0)
    args = golden_args(golden_root, "corpus_gpt2") | dict(num_proc=2)
    calls = []

    def interrupt(seconds):
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setenv(prepare.SLEEP_ENV, "0.001")
    with monkeypatch.context() as m:
        m.setattr(prepare.time, "sleep", interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare_dataset("golden_corpus_gpt2", data_dir=tmp_path / "d", **args)
    work = tmp_path / ".d.partial"
    kept = {p.name: p.stat().st_ino for p in work.glob("train_*.bin")}
    assert len(kept) == 3
    monkeypatch.delenv(prepare.SLEEP_ENV)
    prepare.prepare_dataset("golden_corpus_gpt2", data_dir=tmp_path / "d", **args)
    assert {f: (tmp_path / "d" / f).stat().st_ino for f in kept} == kept
    assert digests(tmp_path / "d", golden_root) == GOLDEN["corpus_gpt2"]


def test_a_rerun_reads_the_map_cache_and_a_changed_file_is_encoded_again(tmp_path, tiktoken_cache):
    """The same command again: no new file in the datasets cache (the rows and their tokens are found there),
    the same shards. A file rewritten with other text of the same size and mtime is encoded again."""
    import os

    import datasets

    from nanogpt_hf.prepare import prepare_dataset

    text = tmp_path / "t.txt"
    text.write_text(make_text(20_000, seed=7), encoding="utf-8")
    args = dict(inputs=[str(text)], tokenizer="gpt2", shard_size=1000)
    prepare_dataset("t", data_dir=tmp_path / "a", **args)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}
    prepare_dataset("t", data_dir=tmp_path / "b", **args)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")} == before
    assert digests(tmp_path / "a", tmp_path) == digests(tmp_path / "b", tmp_path)
    stat = text.stat()
    text.write_text(make_text(20_000, seed=7).replace("the", "THE"), encoding="utf-8")
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert text.stat().st_size == stat.st_size and text.stat().st_mtime_ns == stat.st_mtime_ns
    prepare_dataset("t", data_dir=tmp_path / "c", **args)
    assert digests(tmp_path / "c", tmp_path) != digests(tmp_path / "a", tmp_path)
    assert len(set(cache.rglob("*.arrow")) - set(before)) >= 2  # new rows and tokens

