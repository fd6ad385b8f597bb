"""torch.compile on CPU: no graph breaks in the model, one graph per kind of call through a whole training run
(the batch-size ramp, evaluation, checkpoint/resume and end-of-run sampling), the same losses as eager.

The graph-break and recompile tests trace with dynamo for real but hand the graphs to the "aot_eager" backend
(AOTAutograd's forward/backward split, no code generation), which is what makes them cheap enough for the
default run; the inductor run (C++ code generation, ~40 s per graph on a busy 2-core CPU) is marked slow.

    python -m pytest tests/test_compile.py -q                  # + -m slow for the inductor run
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import StaticCache

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.trainer import train
from test_trainer import read_dump, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def graph_breaks(fn, *args, **kwargs):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    return explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize("position_embedding", ["learned", "alibi", "rope"])
def test_no_graph_breaks_in_training_eval_and_static_decoding(position_embedding):
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                             position_embedding=position_embedding))
    x = torch.randint(0, 64, (3, 16))
    assert graph_breaks(model, x, shift_labels=x) == (0, [])  # the training forward
    model.eval()
    with torch.no_grad():
        assert graph_breaks(model, x, attention_mask=torch.ones_like(x), labels=x) == (0, [])
        # one decoding step on a static cache: the compiled step generate() runs (no sync on the cache length)
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(x[:1], cache=cache, use_cache=True)
        assert graph_breaks(model, x[:1, :1], cache=cache, use_cache=True) == (0, [])


def unique_graphs():
    return counters["stats"]["unique_graphs"]


def test_compiled_run_makes_one_graph_per_kind_of_call(char_data_dir, tmp_path, monkeypatch):
    """--compile true through the trainer: the batch-size ramp (B 2 -> 4), three evaluations, checkpoints and a
    resume in the same process make exactly two graphs (training forward+backward, evaluation forward), and
    the losses are eager's."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    ramp = dict(batch_size_warmup_iters=6, batch_size_warmup_start=2, max_iters=8, eval_interval=4,
                lr_decay_iters=12, debug_dump_dir=str(tmp_path / "dump"))
    eager = train(tiny_cfg(char_data_dir, tmp_path / "eager", **ramp))
    fresh_state()
    torch._dynamo.reset()
    counters.clear()
    compiled = train(tiny_cfg(char_data_dir, tmp_path / "compiled", compile=True, **ramp))
    assert unique_graphs() == 2, f"{unique_graphs()} graphs: something recompiles (run with TORCH_LOGS=recompiles)"
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-5)
    fresh_state()
    resumed = train(tiny_cfg(char_data_dir, tmp_path / "compiled", compile=True, init_from="resume",
                             sample_at_end=1, **{**ramp, "max_iters": 12}))
    assert unique_graphs() <= 4, f"{unique_graphs()} graphs after resuming: more than a fresh run's two"
    losses = [r["loss"] for r in read_dump(tmp_path / "dump" / "rank0.jsonl")]
    assert len(losses) == 8 + 8 + 4 and losses[8:16] == pytest.approx(losses[:8], abs=1e-5)  # eager, compiled
    assert resumed["final_iter"] == 12


def fresh_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.slow
def test_inductor_training_matches_eager(char_data_dir, tmp_path, monkeypatch):
    """The real thing: --compile true with inductor (C++ kernels) trains to eager's losses."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    args = dict(max_iters=4, eval_interval=4, lr_decay_iters=4, debug_dump_dir=str(tmp_path / "dump"))
    train(tiny_cfg(char_data_dir, tmp_path / "eager", **args))
    fresh_state()
    torch._dynamo.reset()
    counters.clear()
    train(tiny_cfg(char_data_dir, tmp_path / "compiled", compile=True, **args))
    assert unique_graphs() == 2
    losses = [r["loss"] for r in read_dump(tmp_path / "dump" / "rank0.jsonl")]
    assert losses[4:] == pytest.approx(losses[:4], abs=1e-4)
