"""transformers' ``LlavaForConditionalGeneration`` assembled from the very weights of a vlm-chat model, for training.

The Llava model itself (tower, projector, LLM base weights, config) comes from :func:`vlm_chat.export.build_llava`,
the same code as ``vlm-chat export --format llava``; here a PEFT LoRA of the same rank on the same projections of the
language model goes on top, with the same adapter weights copied in, so both sides train the same model. Only the
language model is adapted (``all-linear`` on the whole Llava would also adapt the tower and the projector).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from vlm_chat.chat import VLMChat
from vlm_chat.export import build_llava as build_llava_model

_LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The modules the Llava LoRA adapts: the projections that ``all-linear`` picks in our LLM, inside Llava's LM only.
LORA_TARGETS = rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(_LM_PROJECTIONS)})"


def build_llava(chat: VLMChat) -> torch.nn.Module:
    """A PEFT-wrapped HF Llava holding ``chat``'s current tower, mapper, LLM and LoRA weights.

    Args:
        chat: A vlm-chat model with an ``mlp`` mapper of depth 2, no pooling, on a Llama-style LLM.

    Returns:
        The Llava model (train mode): LoRA and projector trainable, everything else frozen.

    Raises:
        ValueError: the mapper is not Llava's projector, or a weight has no counterpart.
    """
    llava = build_llava_model(chat, merge_lora=False)  # base weights; the adapter is copied in below, unmerged
    causal_lm = chat.model.causal_lm
    if causal_lm.config.model_type != "llama":
        raise ValueError(f"the LoRA name mapping is written for Llama-style LLMs, got {causal_lm.config.model_type!r}")
    cfg = chat.config.lm
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS)
    llava = get_peft_model(llava, lora)
    theirs = dict(llava.named_parameters())
    copied = 0
    with torch.no_grad():
        for k, v in causal_lm.state_dict().items():
            if ".lora_" not in k:
                continue
            # ours: model.layers.0.self_attn.q_proj.lora_A.default.weight (under the CausalLM)
            name = "base_model.model.model.language_model." + k.removeprefix("model.")
            if name not in theirs:
                raise ValueError(f"LoRA weight {k} has no Llava counterpart {name}")
            theirs[name].copy_(v)
            copied += 1
    n_lora = sum(1 for n in theirs if ".lora_" in n)
    if copied != n_lora:
        raise ValueError(f"copied {copied} LoRA tensors into Llava, which has {n_lora}")
    for name, p in llava.named_parameters():
        p.requires_grad_(".lora_" in name or "multi_modal_projector" in name)
    llava.train()
    return llava
