"""AdamW over named parameter groups (mapper, LoRA, ...), each with its own learning rate; no decay on biases/norms."""

from __future__ import annotations

import torch

from vlm_chat.training.args import ConfigError, TrainConfig

__all__ = ["build_optimizer"]


def build_optimizer(model: torch.nn.Module, param_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (``[{"name", "params", "lr"?, "weight_decay"?}]``; None: one group of all
    trainable parameters). ``cfg.lr_groups`` overrides learning rates by group name; every trainable parameter must be
    in exactly one group, and no frozen one in any.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if param_groups is None:
        param_groups = [{"name": "default", "params": [p for p in model.parameters() if p.requires_grad]}]
    group_names = [g.get("name", f"group{i}") for i, g in enumerate(param_groups)]
    if len(set(group_names)) != len(group_names):
        raise ValueError(f"parameter group names must be unique, got {group_names}")
    lr_groups = dict(cfg.lr_groups or {})
    unknown = sorted(set(lr_groups) - set(group_names))
    if unknown:
        raise ConfigError(f"config key 'lr_groups' names unknown parameter group(s) {unknown}; valid: {group_names}")

    seen: set[int] = set()
    groups = []
    for name, group in zip(group_names, param_groups):
        params = list(group["params"])
        frozen = [names.get(id(p), "?") for p in params if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameter group {name!r} holds frozen parameters: {frozen[:5]}")
        twice = [names.get(id(p), "?") for p in params if id(p) in seen]
        if twice:
            raise ValueError(f"parameters in more than one group (second: {name!r}): {twice[:5]}")
        seen.update(id(p) for p in params)
        lr = lr_groups.get(name, group.get("lr", cfg.learning_rate))
        weight_decay = group.get("weight_decay", cfg.weight_decay)
        # No decay on biases, norms and scalars (logit scale): decaying them hurts and is not regularisation.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, ps, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name + suffix})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are in no parameter group, e.g. {missing[:5]}")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
