"""transformers' own common model tests (ModelTesterMixin, ConfigTester, TrainingTesterMixin) run against NanoGPT,
the way transformers' tests/models/gpt2/test_modeling_gpt2.py runs them against GPT-2.

Those mixins are not part of the transformers wheel; they live in the tests/ folder of its source distribution.
Point NANOGPT_TRANSFORMERS_TESTS_DIR at that folder (or at the unpacked sdist that contains it), for the *installed*
transformers version; without it, or on a version mismatch, this whole module is skipped:

    pip download --no-deps --no-binary :all: "transformers==$(python -c 'import transformers; print(transformers.__version__)')"
    tar xzf transformers-*.tar.gz && export NANOGPT_TRANSFORMERS_TESTS_DIR=$PWD/transformers-<version>/tests

The sdist ships only the top-level tests/*.py files, not the sub-packages test_modeling_common.py imports from
(tests/exporters, tests/generation, tests/utils). Where one of those files is missing, a stub stands in for it:
ExportTesterMixin (torch.export tests) and GenerationTesterMixin are then empty, and ConfigTester's
check_config_arguments_init has no kwargs to check. A full git checkout of the matching tag runs them all.
"""

import importlib
import os
import re
import sys
import types
import unittest
import warnings
from pathlib import Path

import pytest
import transformers

TESTS_DIR_VAR = "NANOGPT_TRANSFORMERS_TESTS_DIR"  # not TRANSFORMERS_*: conftest.py drops those
PKG = "_transformers_common_tests"  # a private name: a top-level package `tests` may already be importable

# submodules of transformers' tests/ that test_modeling_common / test_configuration_common import, but that the
# sdist does not ship; stand-ins used only where the real file is missing
STUBS = {
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
    "test_training_mixin": {"TrainingTesterMixin": type("TrainingTesterMixin", (), {})},  # newer than 5.0
}


def _source_version(root: Path):
    """The transformers version of a source tree / unpacked sdist: src/transformers/__init__.py, else PKG-INFO,
    else setup.py."""
    probes = [(root / "src" / "transformers" / "__init__.py", r'^__version__\s*=\s*["\']([^"\']+)["\']'),
              (root / "PKG-INFO", r"^Version:\s*(\S+)"),
              (root / "setup.py", r'^\s*version\s*=\s*["\']([^"\']+)["\']')]
    for path, pattern in probes:
        if path.is_file():
            m = re.search(pattern, path.read_text(encoding="utf-8", errors="replace"), re.M)
            if m:
                return m.group(1)
    return None


def _locate_tests_dir():
    """(tests_dir, None) or (None, reason to skip)."""
    raw = os.environ.get(TESTS_DIR_VAR)
    if not raw:
        return None, (f"{TESTS_DIR_VAR} is not set: point it at the tests/ folder of the transformers "
                      f"{transformers.__version__} sdist (see this file's docstring)")
    path = Path(raw).expanduser().resolve()
    tests = path if (path / "test_modeling_common.py").is_file() else path / "tests"
    if not (tests / "test_modeling_common.py").is_file():
        return None, f"{TESTS_DIR_VAR}={raw}: no test_modeling_common.py there or in its tests/ folder"
    version = _source_version(tests.parent)
    if version != transformers.__version__:
        return None, (f"{TESTS_DIR_VAR}={raw} holds the tests of transformers {version or '(unknown version)'}, "
                      f"but transformers {transformers.__version__} is installed")
    return tests, None


def _import_common(tests: Path):
    """Import transformers' tests/ as package PKG (stubbing what is missing); returns the set of stubbed modules."""
    stubbed = set()
    if PKG not in sys.modules:
        package = types.ModuleType(PKG)
        package.__path__ = [str(tests)]
        package.__package__ = PKG
        sys.modules[PKG] = package
    for dotted, attrs in STUBS.items():
        if (tests / (dotted.replace(".", "/") + ".py")).is_file():
            continue
        stubbed.add(dotted)
        parent = dotted.rpartition(".")[0]
        if parent and not (tests / parent).is_dir():
            sub = sys.modules.setdefault(f"{PKG}.{parent}", types.ModuleType(f"{PKG}.{parent}"))
            sub.__path__ = []
        module = types.ModuleType(f"{PKG}.{dotted}")
        module.__dict__.update(attrs)
        sys.modules[f"{PKG}.{dotted}"] = module
    return stubbed


_tests_dir, _skip_reason = _locate_tests_dir()
if _skip_reason:
    pytest.skip(_skip_reason, allow_module_level=True)
_STUBBED = _import_common(_tests_dir)

import torch  # noqa: E402


def _import_mixins():
    import transformers.utils

    real_direct_import = transformers.utils.direct_transformers_import

    def direct_import(path, file="__init__.py"):
        # test_configuration_common "imports transformers" through tests/__init__.py, which the sdist lacks
        if not os.path.isfile(os.path.join(path, file)):
            return transformers
        return real_direct_import(path, file)

    transformers.utils.direct_transformers_import = direct_import
    try:
        with warnings.catch_warnings():  # marks of transformers' own pytest config (flash_attn_test, ...)
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            return [importlib.import_module(f"{PKG}.{name}")
                    for name in ("test_modeling_common", "test_configuration_common", "test_training_mixin")]
    finally:
        transformers.utils.direct_transformers_import = real_direct_import


_common, _config_common, _training_common = _import_mixins()
ModelTesterMixin, GenerationTesterMixin = _common.ModelTesterMixin, _common.GenerationTesterMixin
# The mixins tell a base model from a head by transformers' own name tables, which only list built-in models:
# without "nanogpt" there, NanoGPTModel is treated as a head (test_training asks it for a loss) and the tests
# for base models only (cache names, output recording, ...) skip. Shadow the tables in the mixin module only;
# transformers' own dicts, which the Auto classes read, stay untouched.
for _table, _class_name in (("MODEL_MAPPING_NAMES", "NanoGPTModel"),
                            ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "NanoGPTForCausalLM")):
    setattr(_common, _table, type(getattr(_common, _table))({**getattr(_common, _table), "nanogpt": _class_name}))
ids_tensor, torch_device = _common.ids_tensor, _common.torch_device
ConfigTester, TrainingTesterMixin = _config_common.ConfigTester, _training_common.TrainingTesterMixin

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM, NanoGPTModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class NanoGPTModelTester:
    """Tiny configs and inputs for the common tests (sizes as transformers' CausalLMModelTester uses for GPT-2)."""

    config_class = NanoGPTConfig
    base_model_class = NanoGPTModel
    causal_lm_class = NanoGPTForCausalLM

    def __init__(self, parent, batch_size=13, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=512, position_embedding="learned",
                 is_training=True, use_input_mask=True, pad_token_id=0, bos_token_id=1, eos_token_id=2):
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.max_position_embeddings, self.position_embedding = max_position_embeddings, position_embedding
        self.is_training, self.use_input_mask = is_training, use_input_mask
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.head_dim = hidden_size // num_attention_heads

    @property
    def all_model_classes(self):
        return (self.base_model_class, self.causal_lm_class)

    def get_config(self):
        return NanoGPTConfig(vocab_size=self.vocab_size, block_size=self.max_position_embeddings,
                             n_layer=self.num_hidden_layers, n_head=self.num_attention_heads, n_embd=self.hidden_size,
                             position_embedding=self.position_embedding, dropout=0.0,
                             pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                             eos_token_id=self.eos_token_id)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # lower-triangular: row i has i+1 real tokens, then right padding (rows past seq_length: no padding)
        input_mask = torch.tril(torch.ones_like(input_ids)) if self.use_input_mask else None
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask):
        model = self.base_model_class(config).to(torch_device).eval()
        model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_lm_head(self, config, input_ids, input_mask):
        model = self.causal_lm_class(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=input_ids)
        self.parent.assertEqual(result.loss.shape, ())
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))


class NanoGPTModelTest(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase):
    all_model_classes = (NanoGPTModel, NanoGPTForCausalLM)
    model_tester_class = NanoGPTModelTester
    model_tester = None  # set in setUp (TrainingTesterMixin declares it abstract)
    test_can_init_all_missing_weights_before_2023 = True  # the mixin guesses a model's age from a copyright line

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=NanoGPTConfig, n_embd=32, n_head=4, n_layer=2)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_lm_head_model(self):
        self.model_tester.create_and_check_lm_head(*self.model_tester.prepare_config_and_inputs())

    if "generation.test_utils" in _STUBBED:
        @unittest.skip("tests/generation/ is not in the transformers sdist, so GenerationTesterMixin is a stub here; "
                       "generate() is covered by tests/test_generation.py")
        def test_generation_tester_mixin_inheritance(self):
            pass


class NanoGPTAlibiModelTester(NanoGPTModelTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, position_embedding="alibi", **kwargs)


class NanoGPTRopeModelTester(NanoGPTModelTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, position_embedding="rope", **kwargs)


class NanoGPTAlibiModelTest(NanoGPTModelTest):
    """The same common tests with ALiBi positions (an additive bias on every attention call, no wpe table)."""
    model_tester_class = NanoGPTAlibiModelTester


class NanoGPTRopeModelTest(NanoGPTModelTest):
    """The same common tests with rotary positions."""
    model_tester_class = NanoGPTRopeModelTester


if __name__ == "__main__":
    unittest.main()
