"""One side of tests/test_fsdp2.py: NanoGPTForCausalLM under torch's FSDP2 (`fully_shard`), on CPU over gloo.

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py train  OUT   # STEPS AdamW steps, DCP checkpoint after SAVE_AT
    torchrun --nproc_per_node 2 tests/fsdp2_worker.py resume OUT   # new processes: model on the meta device, DCP load,
                                                                   # the steps after SAVE_AT again

Each rank trains on its half of every global batch; FSDP2 averages the gradients, so the updates are those of
one process on the whole batch (`reference()` below, run by the test itself). Written to OUT (rank 0):
    train.json / resume.json   {"losses": [global mean loss per step], "tied": bool, "logits": [...]}
    model/                     a save_pretrained folder from the gathered full state dict (train only)
    dcp/                       the sharded torch.distributed.checkpoint (train only)
"""

import json
import os
import sys
from pathlib import Path

import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM

STEPS, SAVE_AT, B, T = 5, 3, 8, 32
CONFIG = dict(vocab_size=67, block_size=T, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def batch(step):
    """The global batch of a step: (B, T) inputs and shifted targets, a pure function of the step."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, CONFIG["vocab_size"], (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def probe():
    return torch.arange(2 * T).remainder(CONFIG["vocab_size"]).view(2, T)


def new_model():
    torch.manual_seed(0)
    return NanoGPTForCausalLM(NanoGPTConfig(**CONFIG))


def optimizer_for(model):
    return model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu",
                                      verbose=False)


def reference():
    """The same STEPS steps in one plain process: losses, and the trained model."""
    model = new_model()
    opt = optimizer_for(model)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = model(x, shift_labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def main(mode, out):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    if mode == "resume":  # the large-model way: no memory for the weights until they are sharded
        with torch.device("meta"):
            model = NanoGPTForCausalLM(NanoGPTConfig(**CONFIG))
    else:
        model = new_model()
    for block in model.transformer.h:  # _no_split_modules: each Block is one FSDP unit
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings (tied to lm_head), ln_f
    if mode == "resume":
        model.to_empty(device="cpu")
    opt = optimizer_for(model)
    first = 0
    if mode == "resume":
        sd, osd = get_state_dict(model, opt)
        dcp.load({"model": sd, "optim": osd}, checkpoint_id=str(out / "dcp"))
        set_state_dict(model, opt, model_state_dict=sd, optim_state_dict=osd)
        first = SAVE_AT
    losses = []
    for step in range(first, STEPS):
        if mode == "train" and step == SAVE_AT:
            sd, osd = get_state_dict(model, opt)
            dcp.save({"model": sd, "optim": osd}, checkpoint_id=str(out / "dcp"))
        x, y = batch(step)
        half = B // world
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        loss = model(x, shift_labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    tied = model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        logits = model(probe()).logits
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if mode == "train":
            plain = NanoGPTForCausalLM(NanoGPTConfig(**CONFIG))
            plain.load_state_dict(full)
            plain.save_pretrained(out / "model")
        report = {"losses": losses, "tied": tied, "logits": logits.tolist(), "keys": sorted(full),
                  "same_storage": full["lm_head.weight"].data_ptr() == full["transformer.wte.weight"].data_ptr()
                  or torch.equal(full["lm_head.weight"], full["transformer.wte.weight"])}
        (out / f"{mode}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
