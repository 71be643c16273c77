"""Damaged checkpoints are refused naming the file at fault; saved LoRA checkpoints reload to the saved weights.

The ``anchor`` tests are known failures of other projects (LLaVA, nanoVLM issues named in each docstring), kept as
regression tests here.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from reliability.inputs import CHECKPOINT_DAMAGE, GEN, QUESTION, damaged_copy, drop_key
from vlm_chat import VLMChat


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_problem(ckpt, tmp_path, case):
    damage, exc, pattern = CHECKPOINT_DAMAGE[case]
    with pytest.raises(exc, match=pattern):
        VLMChat.from_pretrained(damaged_copy(ckpt, tmp_path, damage), device="cpu")


def _nudge(chat: VLMChat, seed: int = 0) -> None:
    """Give LoRA and the mapper non-trivial values, as training would (a fresh LoRA B is all zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            if "lora_B" in name or name.startswith("mapper."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_anchor_lora_checkpoint_loads_and_merges_without_size_mismatch(tiny_clip_dir, tiny_smollm2_dir, tmp_path, refs):
    """LLaVA #462 / #744: "size mismatch for ...embed_tokens.weight" when loading or merging a LoRA checkpoint whose
    tokenizer gained tokens. Our adapter stores no embedding rows, so it loads with plain PEFT onto the base model
    resized to the checkpoint's tokenizer, and merging there gives exactly the weights our export wrote.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    _nudge(chat)
    chat.save_pretrained(tmp_path / "ckpt")
    chat.export(tmp_path / "merged")
    saved = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    assert saved and not [k for k in saved if "embed_tokens" in k or "lm_head" in k]

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(tiny_smollm2_dir)
    assert base.get_input_embeddings().weight.shape[0] < len(tokenizer)  # the image token was added
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    merged = PeftModel.from_pretrained(base, tmp_path / "ckpt" / "adapter").merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "lm")
    ours, theirs = exported.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    new_row = len(tokenizer) - 1  # the image token: never read (visual tokens replace it), zero in ours
    for key, value in ours.items():
        if "embed_tokens" in key or "lm_head" in key:
            assert value.shape == theirs[key].shape, key
            value, other = value[:new_row], theirs[key][:new_row]
        else:
            other = theirs[key]
        torch.testing.assert_close(value, other, msg=key)
    again = VLMChat.from_pretrained(tmp_path / "merged", device="cpu")
    assert again.generate(refs["scene"], QUESTION, **GEN) == chat.generate(refs["scene"], QUESTION, **GEN)


def test_anchor_reloaded_weights_are_the_saved_weights(tiny_clip_dir, tiny_smollm2_dir, tmp_path, refs):
    """nanoVLM PR #15: garbage tokens after reloading saved weights (tied embeddings / tensors lost in serialisation).

    On SmolLM2's architecture (tied input/output embeddings) with trained-looking LoRA and mapper weights, every
    tensor of the reloaded model equals the saved one, the embeddings stay tied, and the answers are identical.
    """
    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    _nudge(chat, seed=1)
    chat.save_pretrained(tmp_path / "ckpt")
    again = VLMChat.from_pretrained(tmp_path / "ckpt", device="cpu")
    before, after = chat.model.state_dict(), again.model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    causal = again.model.causal_lm
    assert causal.get_output_embeddings().weight.data_ptr() == causal.get_input_embeddings().weight.data_ptr()
    for image in (refs["scene"], refs["gray"]):
        assert again.generate(image, QUESTION, **GEN) == chat.generate(image, QUESTION, **GEN)


def test_anchor_adapter_with_missing_weights_is_refused(ckpt, tmp_path):
    """nanoVLM PR #15, the other way to reload garbage: PEFT only warns ("Found missing adapter keys") when an adapter
    file lacks LoRA weights and keeps their fresh init, so the reloaded model silently differs from the saved one.
    Found by this catalogue; now refused."""
    damaged = damaged_copy(ckpt, tmp_path, drop_key("adapter/adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors lacks 1 LoRA weight"):
        VLMChat.from_pretrained(damaged, device="cpu")


