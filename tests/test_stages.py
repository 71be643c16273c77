"""Stages 1-3 on a tiny shapes-world set: losses fall, the right parameters train, the result loads as a VLMChat."""

import json

import pytest
import torch

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training.stages import run


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, 6, seed=3, image_size=32, pope_per_image=0, max_turns=2)
    return out


def _common(tmp, **extra):
    # One fixed batch of 4 samples, seen every step: an overfit check whose loss must fall.
    args = ["--output_dir", str(tmp), "--per_device_batch_size", "4", "--max_train_samples", "4", "--logging_steps", "1", "--save_steps", "0",
            "--disable_tqdm", "true", "--max_length", "160", "--lr_scheduler", "constant"]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def _losses(result):
    return [h["loss"] for h in result["history"]]


def test_pretrain_instruct_dpo_chain(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    pre = run("pretrain", _common(tmp_path / "pre", vision=tiny_clip_dir, lm=tiny_smollm2_dir, max_steps=8,
                                  train_file=shapes_dir / "captions.jsonl", mapper_lr=3e-3, lora_r=4,
                                  lora_dropout=0.0))
    assert _losses(pre)[-1] < _losses(pre)[0]
    stage1 = VLMChat.from_pretrained(pre["final_dir"])
    # Stage 1 trains the mapper only: LoRA B is still all zeros.
    assert all(torch.count_nonzero(p) == 0 for n, p in stage1.model.lm.named_parameters() if "lora_B" in n)
    assert (tmp_path / "pre" / "config.yaml").is_file()

    ins = run("instruct", _common(tmp_path / "ins", init_from=pre["final_dir"], max_steps=8,
                                  train_file=shapes_dir / "conversations.json", mapper_lr=3e-3, lora_lr=3e-3))
    assert _losses(ins)[-1] < _losses(ins)[0]
    stage2 = VLMChat.from_pretrained(ins["final_dir"])
    assert any(torch.count_nonzero(p) > 0 for n, p in stage2.model.lm.named_parameters() if "lora_B" in n)
    assert not torch.equal(stage2.model.mapper.proj[0].weight, stage1.model.mapper.proj[0].weight)

    dpo = run("dpo", _common(tmp_path / "dpo", init_from=ins["final_dir"], max_steps=6, train_mapper="false",
                             train_file=shapes_dir / "preferences.jsonl", lora_lr=3e-3, beta=0.5))
    losses = _losses(dpo)
    # The reference is a frozen copy of the instruct adapter: at step 1 policy == reference, so the loss is ln 2.
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses[-1] < losses[0]
    assert dpo["history"][-1]["reward_accuracy"] > 0.5
    assert not (tmp_path / "dpo" / "final" / "adapter" / "reference").exists()  # only the trained adapter is saved
    stage3 = VLMChat.from_pretrained(dpo["final_dir"])
    torch.testing.assert_close(stage3.model.mapper.proj[0].weight, stage2.model.mapper.proj[0].weight, rtol=0, atol=0)
    assert stage3.generate(shapes_dir / "images" / "shapes_3_0.png", "What shapes are there?", max_new_tokens=4)
    assert "Stage `dpo`" in (tmp_path / "dpo" / "final" / "README.md").read_text()


def test_dpo_starts_at_log2_when_policy_equals_reference(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    """A fresh LoRA adapter (B = 0) makes policy and reference (adapters disabled) equal: loss = -log sigmoid(0)."""
    dpo = run("dpo", _common(tmp_path / "dpo", vision=tiny_clip_dir, lm=tiny_smollm2_dir, max_steps=1,
                             train_file=shapes_dir / "preferences.jsonl"))
    assert _losses(dpo)[0] == pytest.approx(0.693147, abs=1e-5)
    assert dpo["history"][0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_key_names_valid_ones(tmp_path):
    with pytest.raises(Exception, match="lora_rank"):
        run("instruct", ["--output_dir", str(tmp_path), "--train_file", "x.json", "--lora_rank", "4"])


def test_bad_row_names_file_and_row(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    rows = [json.loads(line) for line in (shapes_dir / "captions.jsonl").read_text().splitlines()]
    rows[1]["image"] = "images/missing.png"
    bad = shapes_dir / "bad_captions.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="bad_captions.jsonl.*row 1"):
        run("pretrain", _common(tmp_path / "x", vision=tiny_clip_dir, lm=tiny_smollm2_dir, max_steps=1,
                                train_file=bad))
    result = run("pretrain", _common(tmp_path / "y", vision=tiny_clip_dir, lm=tiny_smollm2_dir, max_steps=1,
                                     train_file=bad, skip_bad_rows="true"))
    assert result["global_step"] == 1


def test_trained_weights_stay_fp32_when_the_model_is_half_precision(tmp_path, shapes_dir, tiny_clip_dir,
                                                                      tiny_smollm2_dir):
    """``dtype: bfloat16`` halves the frozen base, but mapper and LoRA train in fp32 (AdamW steps below bf16's
    resolution would vanish; fp16's gradient scaler refuses fp16 gradients)."""
    from safetensors import safe_open

    result = run("instruct", _common(tmp_path / "ins", vision=tiny_clip_dir, lm=tiny_smollm2_dir, max_steps=3,
                                     train_file=shapes_dir / "conversations.json", dtype="bfloat16", lora_r=4,
                                     mapper_lr=3e-3, lora_lr=3e-3))
    final = tmp_path / "ins" / "final"
    with safe_open(str(final / "mapper.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    with safe_open(str(final / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(_losses(result))))
    chat = VLMChat.from_pretrained(final, device="cpu")  # the saved config keeps dtype bfloat16 for inference
    assert chat.model.mapper.proj[0].weight.dtype == torch.bfloat16
    assert chat.generate(shapes_dir / "images" / "shapes_3_0.png", "What shapes are there?", max_new_tokens=3)
