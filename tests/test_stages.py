"""Stages 1-3 on a tiny shapes-world set: losses fall, the right parameters train, the result loads as a VLMChat.

Runs go through the Python API (``load_stage_config`` + ``run_stage``), as the quickstart and the benchmarks do.
"""

import json
from pathlib import Path

import pytest
import torch

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training import ConfigError, load_stage_config, run_stage


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, 6, seed=3, image_size=32, pope_per_image=0, max_turns=2)
    return out


def _common(tmp, **extra):
    # One fixed batch of 4 samples, seen every step: an overfit check whose loss must fall.
    base = {"output_dir": tmp, "per_device_train_batch_size": 4, "max_train_samples": 4, "logging_steps": 1,
            "save_steps": 0, "disable_tqdm": True, "lr_scheduler_type": "constant"}
    return {**base, **extra}


def _model(vision, lm, **lm_keys):
    return {"model.vision.name_or_path": str(vision), "model.lm.name_or_path": str(lm), "model.lm.max_length": 160,
            **{f"model.lm.{k}": v for k, v in lm_keys.items()}}


def run(stage, overrides):
    return run_stage(load_stage_config(stage, overrides={k: str(v) if isinstance(v, Path) else v
                                                         for k, v in overrides.items()}))


def _losses(result):
    return [h["loss"] for h in result.history]


def test_pretrain_instruct_dpo_chain(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    pre = run("pretrain", _common(tmp_path / "pre", **_model(tiny_clip_dir, tiny_smollm2_dir, lora_r=4, lora_dropout=0.0),
                                  max_steps=8, train_file=shapes_dir / "captions.jsonl", mapper_lr=3e-3))
    assert _losses(pre)[-1] < _losses(pre)[0]
    stage1 = VLMChat.from_pretrained(pre.final_dir)
    # Stage 1 trains the mapper only: LoRA B is still all zeros.
    assert all(torch.count_nonzero(p) == 0 for n, p in stage1.model.lm.named_parameters() if "lora_B" in n)
    assert (tmp_path / "pre" / "config.yaml").is_file()

    ins = run("instruct", _common(tmp_path / "ins", init_from=pre.final_dir, max_steps=8,
                                  train_file=shapes_dir / "conversations.json", mapper_lr=3e-3, lora_lr=3e-3))
    assert _losses(ins)[-1] < _losses(ins)[0]
    stage2 = VLMChat.from_pretrained(ins.final_dir)
    assert any(torch.count_nonzero(p) > 0 for n, p in stage2.model.lm.named_parameters() if "lora_B" in n)
    assert not torch.equal(stage2.model.mapper.proj[0].weight, stage1.model.mapper.proj[0].weight)

    dpo = run("dpo", _common(tmp_path / "dpo", init_from=ins.final_dir, max_steps=6, train_mapper=False,
                             train_file=shapes_dir / "preferences.jsonl", lora_lr=3e-3, beta=0.5))
    losses = _losses(dpo)
    # The reference is a frozen copy of the instruct adapter: at step 1 policy == reference, so the loss is ln 2.
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses[-1] < losses[0]
    assert dpo.history[-1]["reward_accuracy"] > 0.5
    assert not (tmp_path / "dpo" / "final" / "adapter" / "reference").exists()  # only the trained adapter is saved
    stage3 = VLMChat.from_pretrained(dpo.final_dir)
    torch.testing.assert_close(stage3.model.mapper.proj[0].weight, stage2.model.mapper.proj[0].weight, rtol=0, atol=0)
    assert stage3.generate(shapes_dir / "images" / "shapes_3_0.png", "What shapes are there?", max_new_tokens=4)
    assert "Stage `dpo`" in (tmp_path / "dpo" / "final" / "README.md").read_text()


def test_dpo_starts_at_log2_when_policy_equals_reference(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    """A fresh LoRA adapter (B = 0) makes policy and reference (adapters disabled) equal: loss = -log sigmoid(0)."""
    dpo = run("dpo", _common(tmp_path / "dpo", **_model(tiny_clip_dir, tiny_smollm2_dir), max_steps=1,
                             train_file=shapes_dir / "preferences.jsonl"))
    assert _losses(dpo)[0] == pytest.approx(0.693147, abs=1e-5)
    assert dpo.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_key_names_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lora_rank' in the command line.*valid keys"):
        load_stage_config("instruct", argv=["--output_dir", str(tmp_path), "--train_file", "x.json", "--lora_rank", "4"])
    with pytest.raises(ConfigError, match=r"'model.lm.lora_rank'.*did you mean 'model.lm.lora_r'"):
        load_stage_config("pretrain", argv=["--output_dir", "o", "--train_file", "x", "--model.lm.lora_rank", "4"])
    # The flat model keys of earlier versions name their place in the model section.
    with pytest.raises(ConfigError, match=r"'mapper_layers' in the overrides is now 'model.mapper.num_layers'"):
        load_stage_config("pretrain", overrides={"output_dir": "o", "train_file": "x", "mapper_layers": 3})
    with pytest.raises(ConfigError, match=r"'model:' \(a new model\) or 'init_from'.*not both"):
        load_stage_config("instruct", overrides={"output_dir": "o", "train_file": "x", "init_from": "ckpt",
                                                 "model.lm.name_or_path": "lm", "model.vision.name_or_path": "v"})


def test_bad_row_names_file_and_row(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    rows = [json.loads(line) for line in (shapes_dir / "captions.jsonl").read_text().splitlines()]
    rows[1]["image"] = "images/missing.png"
    bad = shapes_dir / "bad_captions.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="bad_captions.jsonl.*row 1"):
        run("pretrain", _common(tmp_path / "x", **_model(tiny_clip_dir, tiny_smollm2_dir), max_steps=1, train_file=bad))
    result = run("pretrain", _common(tmp_path / "y", **_model(tiny_clip_dir, tiny_smollm2_dir), max_steps=1,
                                     train_file=bad, skip_bad_rows=True))
    assert result.global_step == 1


def test_trained_weights_stay_fp32_when_the_model_is_half_precision(tmp_path, shapes_dir, tiny_clip_dir,
                                                                      tiny_smollm2_dir):
    """``dtype: bfloat16`` halves the frozen base, but mapper and LoRA train in fp32 (AdamW steps below bf16's
    resolution would vanish; fp16's gradient scaler refuses fp16 gradients)."""
    from safetensors import safe_open

    result = run("instruct", _common(tmp_path / "ins", **_model(tiny_clip_dir, tiny_smollm2_dir, dtype="bfloat16", lora_r=4),
                                     max_steps=3, train_file=shapes_dir / "conversations.json", mapper_lr=3e-3,
                                     lora_lr=3e-3))
    final = tmp_path / "ins" / "final"
    with safe_open(str(final / "mapper.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    with safe_open(str(final / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(_losses(result))))
    chat = VLMChat.from_pretrained(final, device="cpu")  # the saved config keeps dtype bfloat16 for inference
    assert chat.model.mapper.proj[0].weight.dtype == torch.bfloat16
    assert chat.generate(shapes_dir / "images" / "shapes_3_0.png", "What shapes are there?", max_new_tokens=3)


@pytest.mark.parametrize(("stage", "train_file"), [("instruct", "conversations.json"), ("dpo", "preferences.jsonl")])
def test_feature_cache_on_and_off_give_the_same_losses(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir, stage,
                                                       train_file):
    """Cache on: the tower runs once per image before training; off: in every step. Same losses either way, also with
    DataLoader workers (which then only read the feature table or preprocess pixels)."""
    losses = {}
    for cache, workers in ((True, 0), (False, 0), (True, 2) if stage == "instruct" else (False, 2)):
        result = run(stage, _common(tmp_path / f"{cache}-{workers}", **_model(tiny_clip_dir, tiny_smollm2_dir),
                                    max_steps=3, train_file=shapes_dir / train_file, mapper_lr=3e-3, lora_lr=3e-3,
                                    cache_vision_features=cache, dataloader_num_workers=workers))
        losses[cache, workers] = _losses(result)
    reference = losses[True, 0]
    assert len(reference) == 3 and reference[-1] != reference[0]
    for key, values in losses.items():
        assert values == pytest.approx(reference, rel=1e-5, abs=1e-6), key


def test_dpo_batch_holds_each_image_once(shapes_dir, tiny_clip_dir, tiny_smollm2_dir):
    from vlm_chat.data import load_preferences
    from vlm_chat.training.stages import Collator, FeatureCache

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    rows = list(load_preferences(shapes_dir / "preferences.jsonl")[0])[:3]
    batch = Collator(chat, "dpo", FeatureCache(chat, enabled=False))(rows)
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 3  # [2B] sequences, [B] images
    cache = FeatureCache(chat, enabled=True)
    assert cache.precompute([r["image"] for r in rows] * 2, progress=False) == len({r["image"] for r in rows})
    batch = Collator(chat, "dpo", cache)(rows)
    assert batch["image_features"].shape[0] == 3
    # Read-only after the pass: a batch with an image outside the table gets pixels (the tower runs in the step).
    other = str(shapes_dir / "images" / "shapes_3_5.png")
    assert other not in cache.store and set(cache([other])) == {"pixel_values"}
    assert other not in cache.store
