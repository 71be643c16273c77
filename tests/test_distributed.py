"""Two CPU processes (DDP over gloo, via `accelerate launch`) train exactly like one process with twice the batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_chat.datasets.shapes import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def _run(launcher, out, shapes, vision, lm, batch):
    args = ["--output_dir", str(out), "--model.vision.name_or_path", str(vision), "--model.lm.name_or_path", str(lm),
            "--max_steps", "4", "--per_device_train_batch_size", str(batch), "--train_file",
            str(shapes / "conversations.json"), "--model.lm.lora_dropout", "0", "--logging_steps", "1", "--save_steps",
            "0", "--model.lm.max_length", "160",
            "--max_turns_per_sample", "2", "--disable_tqdm", "true", "--mapper_lr", "3e-3", "--lora_lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(launcher + [str(ROOT / "train" / "instruct.py"), *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(tmp_path, tiny_clip_dir, tiny_smollm2_dir):
    shapes = tmp_path / "shapes"
    write_shapes_dataset(shapes, 16, seed=5, image_size=32, pope_per_image=0, max_turns=2)
    # accelerate runs CPU DDP (gloo) through its multi-process launcher when told to use the CPU.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _run(accelerate, tmp_path / "two", shapes, tiny_clip_dir, tiny_smollm2_dir, batch=2)
    one = _run([sys.executable], tmp_path / "one", shapes, tiny_clip_dir, tiny_smollm2_dir, batch=4)
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4)
    a = load_file(str(tmp_path / "one" / "final" / "mapper.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "mapper.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
