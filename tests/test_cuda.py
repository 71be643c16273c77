"""The GPU paths: half-precision weights, bf16/fp16 mixed precision, CUDA inference. Skipped without a CUDA device
(CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py`` (docs/training.md)."""

import math

import pytest
import torch

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training import load_stage_config, run_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_cuda")
    write_shapes_dataset(out, 6, seed=3, image_size=32, pope_per_image=0, max_turns=2)
    return out


def _args(out, **extra):
    args = {"output_dir": str(out), "per_device_train_batch_size": 4, "max_train_samples": 4, "logging_steps": 1,
            "save_steps": 0, "disable_tqdm": True, "lr_scheduler_type": "constant"}
    return {**args, **{k: str(v) if hasattr(v, "is_dir") else v for k, v in extra.items()}}


def run(stage, overrides):
    return run_stage(load_stage_config(stage, overrides=overrides))


def _model(vision, lm, dtype, lora_r=16):
    return {"model.vision.name_or_path": str(vision), "model.lm.name_or_path": str(lm), "model.lm.dtype": dtype,
            "model.lm.lora_r": lora_r, "model.lm.max_length": 160}


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("fp16", "float16"), ("no", "auto")])
def test_stages_train_on_cuda(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir, precision, dtype):
    """Stages 1-3 on the GPU with half-precision base weights: finite, falling losses; the result loads on CUDA."""
    common = {"mixed_precision": precision, "seed": 0}
    pre = run("pretrain", _args(tmp_path / "pre", **_model(tiny_clip_dir, tiny_smollm2_dir, dtype, lora_r=4),
                                max_steps=8, train_file=shapes_dir / "captions.jsonl", mapper_lr=3e-3, **common))
    ins = run("instruct", _args(tmp_path / "ins", init_from=pre.final_dir, max_steps=8, mapper_lr=3e-3,
                                lora_lr=3e-3, train_file=shapes_dir / "conversations.json", **common))
    dpo = run("dpo", _args(tmp_path / "dpo", init_from=ins.final_dir, max_steps=6, train_mapper=False, beta=0.5,
                           lora_lr=3e-3, train_file=shapes_dir / "preferences.jsonl", **common))
    for result in (pre, ins, dpo):
        losses = [h["loss"] for h in result.history]
        assert all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0], losses
    assert [h["loss"] for h in dpo.history][0] == pytest.approx(math.log(2), abs=2e-3)
    chat = VLMChat.from_pretrained(dpo.final_dir)
    assert chat.device.type == "cuda"
    expected = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.bfloat16)  # auto: bf16 on GPUs
    assert chat.model.mapper.proj[0].weight.dtype == expected
    assert chat.generate(shapes_dir / "images" / "shapes_3_0.png", "What shapes are there?", max_new_tokens=4)


def test_cuda_and_cpu_logits_agree_in_fp32(tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir, monkeypatch):
    """The same fp32 checkpoint gives the same next-token logits on both devices (only kernel rounding differs)."""
    from vlm_chat.images import load_image

    # cuDNN convolutions (the patch embedding) default to TF32 on recent GPUs: 10-bit mantissas, not fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    VLMChat.from_components(tiny_clip_dir, tiny_smollm2_dir, lm_config={"dtype": "float32"}, device="cpu"
                            ).save_pretrained(tmp_path / "ckpt")
    image = load_image(shapes_dir / "images" / "shapes_3_0.png")
    logits = {}
    for device in ("cpu", "cuda"):
        chat = VLMChat.from_pretrained(tmp_path / "ckpt", device=device)
        batch = chat.processor.pad([chat.processor.encode_prompt("What colour is it?")], "left")
        batch["pixel_values"] = chat.processor.pixel_values([image])
        with torch.no_grad():
            logits[device] = chat.model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)
