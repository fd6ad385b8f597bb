"""
The trainer's optimizers: nanoGPT's AdamW, or Muon for the hidden matrices and AdamW for the rest.

    --optimizer adamw   model.configure_optimizers: AdamW, weight decay on the >= 2-D tensors (nanoGPT)
    --optimizer muon    torch.optim.Muon for the 2-D weight matrices inside the blocks (attention and MLP), AdamW
                        for everything else: token/position embeddings (= the tied head), LayerNorms, biases.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) replaces each matrix's momentum by the nearest
semi-orthogonal matrix (5 Newton-Schulz iterations, in bf16): every direction of the update gets the same size.
That only makes sense for a matrix that maps a hidden state to a hidden state, hence AdamW for the embedding
(a lookup table) and for 1-D tensors, as in modded-nanogpt's speedrun.

Both learning rates follow the trainer's one schedule (get_lr), each scaled to its own peak: learning_rate for
AdamW's groups, muon_learning_rate for Muon's (lr_scales, set_lr).
"""

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters that step, zero, save and load as one torch Optimizer.

    Why one: Accelerate and the fp16 GradScaler expect one optimizer per update. With two, each one's step would
    call scaler.update(), and the second one's gradients would be unscaled a second time. As one optimizer the
    gradients are unscaled once (before clipping), one inf check skips or takes the whole update, and a
    checkpoint is one ordinary optimizer state_dict (what FSDP's and DeepSpeed's savers expect too).

    The param_groups and the state are shared with the inner optimizers, not copied, so the base class's
    zero_grad, state_dict and load_state_dict work as they are; load_state_dict builds new ones, which the inner
    optimizers are then pointed at again."""

    def __init__(self, *optimizers):
        super().__init__([group for opt in optimizers for group in opt.param_groups], {})  # the same dicts
        self.optimizers = optimizers
        self._share()

    def _share(self):
        groups = iter(self.param_groups)
        for opt in self.optimizers:
            opt.param_groups = [next(groups) for _ in opt.param_groups]
            opt.state = self.state  # one dict keyed by parameter: the parameter sets are disjoint

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("CombinedOptimizer.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._share()


def split_params(model):
    """(hidden, other): the blocks' 2-D weight matrices (for Muon), and every other trainable parameter (for AdamW).
    Each tensor appears once: the tied lm_head is transformer.wte."""
    hidden = [p for block in model.transformer.h for p in block.parameters() if p.requires_grad and p.dim() == 2]
    in_hidden = {id(p) for p in hidden}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in in_hidden]
    return hidden, other


def build_optimizer(model, cfg, device_type, verbose=True):
    """The optimizer that cfg.optimizer names, each param group at its peak learning rate."""
    if cfg.optimizer == "adamw":
        return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                          verbose=verbose)
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    hidden, other = split_params(model)
    # AdamW for the rest, with configure_optimizers' rule: decay the embeddings, not the LayerNorms and biases
    adamw = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                       verbose=verbose, params=other)
    # torch's default lr adjustment ("original", Keller Jordan's): x sqrt(max(1, rows / cols)), e.g. x2 for c_fc
    muon = torch.optim.Muon(hidden, lr=cfg.muon_learning_rate, momentum=cfg.muon_momentum,
                            weight_decay=cfg.muon_weight_decay)
    if verbose:
        print(f"num Muon parameter tensors: {len(hidden)}, with {sum(p.numel() for p in hidden):,} parameters")
    return CombinedOptimizer(muon, adamw)


def lr_scales(optimizer, cfg):
    """Each param group's peak learning rate as a multiple of cfg.learning_rate (exactly 1.0 for AdamW's groups).
    Call it on the optimizer as built, before a checkpoint's groups are loaded: the current config decides."""
    return [group["lr"] / cfg.learning_rate for group in optimizer.param_groups]


def set_lr(optimizer, lr, scales):
    """lr (get_lr's value at this iteration) into every param group, times the group's scale."""
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        group["lr"] = lr * scale


__all__ = ["CombinedOptimizer", "split_params", "build_optimizer", "lr_scales", "set_lr"]
