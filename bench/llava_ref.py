"""transformers' ``LlavaForConditionalGeneration`` assembled from the very weights of a vlm-chat model.

Same vision tower (layer -2, CLS dropped: Llava's ``vision_feature_select_strategy="default"``), the same 2-layer GELU
MLP (Llava's ``multi_modal_projector``: linear_1, gelu, linear_2), the same LLM base weights, and a PEFT LoRA of the
same rank on the same projections of the language model, with the same adapter weights copied in. Only the language
model is adapted (``all-linear`` on the whole Llava would also adapt the tower and the projector).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from vlm_chat.chat import VLMChat

_LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The modules the Llava LoRA adapts: the projections that ``all-linear`` picks in our LLM, inside Llava's LM only.
LORA_TARGETS = rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(_LM_PROJECTIONS)})"


def build_llava(chat: VLMChat) -> torch.nn.Module:
    """A PEFT-wrapped HF Llava holding ``chat``'s current tower, mapper, LLM and LoRA weights.

    Args:
        chat: A vlm-chat model with an ``mlp`` mapper of depth 2, no pooling, on a CLIP tower.

    Returns:
        The Llava model (train mode): LoRA and projector trainable, everything else frozen.

    Raises:
        ValueError: the mapper is not Llava's projector, or a weight has no counterpart.
    """
    cfg = chat.config
    if cfg.mapper.kind != "mlp" or cfg.mapper.depth != 2 or cfg.mapper.pool != 1:
        raise ValueError("HF Llava's projector is a 2-layer MLP without pooling; build the chat with mapper='mlp', "
                         f"depth=2, pool=1 (got {cfg.mapper.kind}, depth={cfg.mapper.depth}, pool={cfg.mapper.pool})")
    tower = chat.model.vision
    if not (tower.has_cls and tower.drop_cls):
        raise ValueError("Llava's 'default' feature strategy drops a CLS token; this tower has none to drop")
    causal_lm = chat.model.causal_lm
    lm_cfg = causal_lm.config
    if lm_cfg.model_type != "llama":
        raise ValueError(f"the LoRA name mapping is written for Llama-style LLMs, got {lm_cfg.model_type!r}")
    llava_cfg = LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=lm_cfg.to_dict(),
        image_token_id=chat.processor.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",  # nn.GELU() in our MLP: exact erf GELU in both
        multimodal_projector_bias=True,
        tie_word_embeddings=lm_cfg.tie_word_embeddings,
    )
    dtype = next(causal_lm.parameters()).dtype
    with no_init_weights():  # every weight is copied in below (strictly checked); random init would only cost time
        llava = LlavaForConditionalGeneration(llava_cfg)
    llava.tie_weights()  # what the skipped init_weights would have done

    state = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    mapper = chat.model.mapper.state_dict()
    for ours, theirs in (("proj.0", "linear_1"), ("proj.2", "linear_2")):
        for p in ("weight", "bias"):
            state[f"model.multi_modal_projector.{theirs}.{p}"] = mapper[f"{ours}.{p}"]
    lora_state = {}
    for k, v in causal_lm.state_dict().items():
        if ".lora_" in k:
            lora_state[k] = v
            continue
        k = k.replace(".base_layer.", ".")
        state["lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")] = v
    missing, unexpected = llava.load_state_dict(state, strict=False)
    # The tied head is one tensor; load_state_dict reports the alias as missing when only one name is given.
    missing = [k for k in missing if not (k == "lm_head.weight" and lm_cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"Llava weights do not line up: missing {missing[:5]}, unexpected {unexpected[:5]}")
    head, embed = llava.get_output_embeddings().weight, llava.get_input_embeddings().weight
    if lm_cfg.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        raise ValueError("Llava's LM head is not tied to its embeddings although the LLM's config ties them")
    llava.to(device=chat.device, dtype=dtype)
    llava.requires_grad_(False)

    lm_cfg_ours = cfg.lm
    lora = LoraConfig(
        r=lm_cfg_ours.lora_r, lora_alpha=lm_cfg_ours.lora_alpha, lora_dropout=lm_cfg_ours.lora_dropout,
        target_modules=LORA_TARGETS,
    )
    llava = get_peft_model(llava, lora)
    theirs = dict(llava.named_parameters())
    copied = 0
    with torch.no_grad():
        for k, v in lora_state.items():
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

