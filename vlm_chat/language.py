"""The causal language model: loaded with ``AutoModelForCausalLM``, given an image token, adapted with PEFT LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors import safe_open
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from vlm_chat.config import LMConfig
from vlm_chat.offline import resolve_lm

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` -> fp32 on CPU (bf16 is ~30x slower on CPUs without bf16 units), bf16 on GPUs that have it."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"lm.dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def load_tokenizer(path: str, image_token: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the LLM's tokenizer and make sure ``image_token`` is one special token."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions are masked out of attention and of the loss
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {path!r} has no chat template; vlm-chat builds prompts with the LLM's own template")
    return tokenizer


def load_lm(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, adapter_dir: str | Path | None = None,
            is_trainable: bool = True) -> torch.nn.Module:
    """Load the causal LM, fit its embeddings to the tokenizer, and attach a LoRA adapter.

    Args:
        cfg: LM configuration (path, LoRA, QLoRA).
        tokenizer: The tokenizer with the image token already added.
        dtype: Compute dtype.
        adapter_dir: A saved PEFT adapter to load instead of creating a fresh one.
        is_trainable: Whether a loaded adapter's weights get gradients.

    Returns:
        The (PEFT-wrapped) model. Base weights are frozen; only LoRA weights may require grad.
    """
    path = resolve_lm(cfg.name_or_path)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}  # never pickles
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    _fit_embeddings(lm, len(tokenizer))
    lm.requires_grad_(False)
    if cfg.load_in_4bit:
        # Casts norms to fp32 and enables input grads so LoRA on a 4-bit base trains stably (QLoRA recipe).
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    if adapter_dir is not None:
        lm = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=is_trainable)
        _check_adapter_complete(lm, Path(adapter_dir) / "adapter_model.safetensors")
    elif cfg.use_lora:
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
        )
        lm = get_peft_model(lm, lora)
    if isinstance(lm, PeftModel):
        # PEFT records the base as the model config's name: our offline alias, or a path relative to wherever the
        # process ran. The saved adapter_config.json should name something peft.AutoPeftModelForCausalLM can open.
        base = str(Path(path).resolve()) if Path(path).is_dir() else path
        for peft_cfg in lm.peft_config.values():
            peft_cfg.base_model_name_or_path = base
    return lm


def _fit_embeddings(lm: torch.nn.Module, vocab_size: int) -> None:
    """Grow the embedding matrix to hold the image token, deterministically.

    The image token's input embedding is never read (visual tokens replace it) and its output logit is suppressed at
    generation, but its rows must be identical every time the model is rebuilt from the same base so that a reload gives
    the same logits: so they are zeros, not the random ``mean_resizing`` init transformers would use.
    """
    old = lm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return  # many LLMs (Qwen2, ...) pad their vocabulary: the new id already has a row
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:].zero_()
        out = lm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
            out.weight[old:].zero_()
            if getattr(out, "bias", None) is not None:
                out.bias[old:].zero_()


def _check_adapter_complete(lm, path: Path) -> None:
    """PEFT only warns about LoRA weights missing from a file and keeps their fresh init; a silently different model
    is the "garbage after reload" failure, so refuse it."""
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    expected = set(get_peft_model_state_dict(lm, save_embedding_layers=False))
    missing = sorted(expected - stored)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} LoRA weight(s) the adapter config asks for, e.g. {missing[0]}")
