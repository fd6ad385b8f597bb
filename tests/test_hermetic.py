"""The suite's results do not depend on the caller's Hugging Face environment (conftest.py cleans it)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOSTILE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token", "HF_HOME": "/nonexistent/hf_home",
           "TRANSFORMERS_CACHE": "/nonexistent/transformers", "HF_HUB_CACHE": "/nonexistent/hub",
           "TIKTOKEN_CACHE_DIR": "/nonexistent/tiktoken"}


def test_conftest_drops_the_callers_hf_environment():
    # (HF_HOME is set to this run's own folder, TIKTOKEN_CACHE_DIR by the tiktoken_cache fixture)
    for name, value in HOSTILE.items():
        assert os.environ.get(name) != value, name
    assert os.path.isdir(os.environ["HF_HOME"])


def test_hub_round_trip_passes_under_a_hostile_environment():
    # the test that failed with HF_HUB_OFFLINE=1 set by the caller, and a hub + pipeline test, in a child pytest
    tests = ["tests/test_trainer.py::test_push_to_hub_while_training_then_finetune_from_the_hub",
             "tests/test_modeling.py::test_pipeline_text_generation"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env={**os.environ, **HOSTILE, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
