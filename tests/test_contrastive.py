"""Stage 0: CLIP/SigLIP training from scratch on solid-colour images, and the standard directory it writes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_chat.data import DataError
from vlm_chat.training.contrastive import load_contrastive_config, main, run_contrastive

REPO = Path(__file__).resolve().parents[1]
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
}
TINY = ["--image_size", "32", "--patch_size", "8", "--vision_hidden_size", "32", "--text_hidden_size", "32",
        "--projection_dim", "32", "--num_heads", "4", "--max_text_length", "12"]  # fmt: skip


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    with open(root / "captions.jsonl", "w") as fh:
        for name, rgb in COLOURS.items():
            Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.png")
            fh.write(json.dumps({"image": f"images/{name}.png", "caption": f"a {name} image"}) + "\n")
    return root / "captions.jsonl"


def _args(captions, out, *extra, steps=20):
    return ["--train_file", str(captions), "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--save_steps", "0", "--report_to", "none", "--disable_tqdm", "true", *TINY, *extra]  # fmt: skip


def run(argv):
    return run_contrastive(load_contrastive_config(argv=argv))


@pytest.fixture(scope="module")
def clip_run(captions, tmp_path_factory):
    return run(_args(captions, tmp_path_factory.mktemp("clip"), "--model_type", "clip"))


@pytest.fixture(scope="module")
def siglip_run(captions, tmp_path_factory):
    return run(_args(captions, tmp_path_factory.mktemp("siglip"), "--model_type", "siglip"))


def _drop(losses):
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return last / first


def test_clip_loss_goes_down_and_retrieval_learns(clip_run):
    history = clip_run.history
    assert _drop([h["loss"] for h in history]) < 0.5
    assert history[-1]["acc_i2t"] == 1.0 and history[-1]["acc_t2i"] == 1.0
    assert "logit_scale" in history[-1]


def test_siglip_loss_goes_down_and_learns_bias(siglip_run):
    history = siglip_run.history
    assert _drop([h["loss"] for h in history]) < 0.5
    assert history[-1]["logit_bias"] != pytest.approx(-10.0)  # the bias is learned


def test_triplet_loss_goes_down_with_frozen_temperature(captions, tmp_path):
    result = run(_args(captions, tmp_path, "--loss", "triplet", steps=40))
    assert _drop([h["loss"] for h in result.history]) < 0.5
    assert torch.equal(result.model.logit_scale.detach(), torch.tensor(math.log(1 / 0.07)))


def _images():
    return [Image.new("RGB", (32, 32), rgb) for rgb in COLOURS.values()]


def test_clip_dir_reloads_as_standard_transformers_model(clip_run):
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

    final = clip_run.final_dir
    trained = clip_run.model.eval()
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"} <= set(
        os.listdir(final)
    )
    processor = AutoProcessor.from_pretrained(final)
    assert type(processor).__name__ == "CLIPProcessor"
    texts = ["a red image", "a teal image and a much longer caption"]
    inputs = processor(text=texts, images=_images()[:2], padding=True, return_tensors="pt")
    reloaded = CLIPModel.from_pretrained(final).eval()
    with torch.no_grad():
        assert torch.equal(
            reloaded.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
            trained.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
        )
        text_kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        assert torch.equal(
            reloaded.get_text_features(**text_kw).pooler_output, trained.get_text_features(**text_kw).pooler_output
        )
        tower = CLIPVisionModel.from_pretrained(final).eval()  # what stage 1 loads
        assert torch.equal(
            tower(pixel_values=inputs["pixel_values"]).pooler_output,
            trained.vision_model(pixel_values=inputs["pixel_values"]).pooler_output,
        )
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("a red image").input_ids == inputs["input_ids"][0].tolist()[:5]


def test_clip_text_pools_at_eos_so_padding_does_not_matter(clip_run):
    model, processor = clip_run.model.eval(), clip_run.processor
    eos = model.config.text_config.eos_token_id
    assert eos == processor.tokenizer.eos_token_id and eos != 2  # 2 would switch CLIP to legacy argmax pooling
    ids = processor.tokenizer("a red image").input_ids
    assert ids[-1] == eos and ids[0] == processor.tokenizer.bos_token_id
    with torch.no_grad():
        alone = model.get_text_features(**processor(text=["a red image"], return_tensors="pt")).pooler_output
        batch = processor(text=["a red image", "a gray image a teal image"], padding=True, return_tensors="pt")
        padded = model.get_text_features(**batch).pooler_output[0]
    assert batch["input_ids"].shape[1] > len(ids)
    torch.testing.assert_close(padded, alone[0], rtol=1e-5, atol=1e-6)
    # A caption cut by truncation still ends with EOS, so it still pools at a real token.
    long = processor.tokenizer(" ".join(["red"] * 40), truncation=True).input_ids
    assert len(long) == model.config.text_config.max_position_embeddings and long[-1] == eos


def test_siglip_dir_reloads_and_pads_to_fixed_length(siglip_run):
    from transformers import AutoProcessor, SiglipModel, SiglipVisionModel

    final = siglip_run.final_dir
    trained = siglip_run.model.eval()
    processor = AutoProcessor.from_pretrained(final)
    assert type(processor).__name__ == "SiglipProcessor"
    max_len = trained.config.text_config.max_position_embeddings
    inputs = processor(
        text=["a red image", "a green image"], images=_images()[:2], padding="max_length", return_tensors="pt"
    )
    assert inputs["input_ids"].shape[1] == max_len
    assert processor.tokenizer("a red image").input_ids[-1] == processor.tokenizer.eos_token_id
    reloaded = SiglipModel.from_pretrained(final).eval()
    with torch.no_grad():
        out_a, out_b = trained(**inputs), reloaded(**inputs)
        assert torch.equal(out_a.logits_per_image, out_b.logits_per_image)
        tower = SiglipVisionModel.from_pretrained(final).eval()
        assert torch.equal(
            tower(pixel_values=inputs["pixel_values"]).pooler_output,
            trained.vision_model(pixel_values=inputs["pixel_values"]).pooler_output,
        )
        # Matching pairs score highest: the trained model ranks its own caption first.
        assert torch.equal(out_b.logits_per_image.argmax(dim=1), torch.arange(2))


def test_init_from_continues_a_checkpoint(clip_run, captions, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    result = run(_args(captions, tmp_path, "--init_from", str(clip_run.final_dir), steps=2))
    assert result.model_type == "clip"

    old = load_file(Path(clip_run.final_dir) / "model.safetensors")
    new = load_file(Path(result.final_dir) / "model.safetensors")
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert AutoTokenizer.from_pretrained(result.final_dir).get_vocab() == clip_run.processor.tokenizer.get_vocab()
    saved = (tmp_path / "config.yaml").read_text()
    assert "model_type: clip" in saved and "loss: clip" in saved
    with pytest.raises(ValueError, match="model_type 'siglip' but init_from"):
        run(_args(captions, tmp_path / "x", "--init_from", str(clip_run.final_dir), "--model_type", "siglip"))


def test_bad_rows_are_named_or_skipped(captions, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = captions.read_text().splitlines() + [json.dumps({"image": "images/missing.png", "caption": "a pink image"})]
    bad.write_text("\n".join(rows) + "\n")
    args = _args(bad, tmp_path / "out", "--image_folder", str(captions.parent), steps=1)
    with pytest.raises(DataError, match=r"bad.jsonl, row 8.*missing.png"):
        run(args)
    result = run([*args, "--skip_bad_rows", "true"])
    assert result.global_step == 1


def test_script_runs_with_the_tiny_config(captions, tmp_path):
    cmd = [sys.executable, str(REPO / "train" / "contrastive.py"), "--config", str(REPO / "configs" / "contrastive_tiny.yaml"),
           "--train_file", str(captions), "--output_dir", str(tmp_path), "--max_steps", "2", "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert "loss: clip" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(SystemExit, match="did you mean 'learning_rate'"):
        main([*cmd[2:], "--lerning_rate", "1"])


def _train_cmd(captions, out, *extra, steps=12):
    return [str(REPO / "train" / "contrastive.py"), *_args(captions, out, *extra, steps=steps)]


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch(captions, tmp_path):
    """2 CPU processes (gloo) x batch 4 == 1 process x batch 8: the embeddings are gathered before the loss."""
    from safetensors.torch import load_file

    one = run(_args(captions, tmp_path / "one", steps=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           *_train_cmd(captions, tmp_path / "two", "--per_device_train_batch_size", "4", steps=4)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 x 1 accumulation x 2 processes" in proc.stderr
    two = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in two] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(captions, tmp_path):
    """Kill the training process with SIGKILL after a few steps; --resume latest ends with identical weights."""
    import signal
    import time

    from safetensors.torch import load_file

    extra = ("--save_steps", "2", "--save_total_limit", "1")
    straight = run(_args(captions, tmp_path / "straight", *extra, steps=40))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_train_cmd(captions, out, *extra, steps=40)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(log.read_text().splitlines())
    assert 5 <= killed_at < 40, killed_at
    resumed = run([*_args(captions, out, *extra, steps=40), "--resume_from_checkpoint", "latest"])
    assert resumed.resumed_from is not None
    assert [json.loads(line)["loss"] for line in log.read_text().splitlines()] == [
        h["loss"] for h in straight.history
    ]
    a = load_file(Path(straight.final_dir) / "model.safetensors")
    b = load_file(Path(resumed.final_dir) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_losses(captions, tmp_path):
    plain = run(_args(captions, tmp_path / "a", steps=3))
    checkpointed = run(_args(captions, tmp_path / "b", "--gradient_checkpointing", "true", steps=3))
    assert checkpointed.model.text_model.encoder.gradient_checkpointing
    assert [h["loss"] for h in checkpointed.history] == pytest.approx(
        [h["loss"] for h in plain.history], rel=1e-5
    )
