"""`python train/quickstart.py --tiny`: stages 0 -> 3 and the evaluation, end to end, on tiny random models."""

import json
import subprocess
import sys
from pathlib import Path

from vlm_chat import VLMChat

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_quickstart_runs_all_stages(tmp_path, red_circle):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "quickstart.py"), "--tiny", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"instruct", "dpo"}
    for stage in ("contrastive", "pretrain", "instruct", "dpo"):
        assert (out / stage / "final").is_dir() and (out / stage / "train_log.jsonl").is_file()
    assert (out / "contrastive" / "final" / "model.safetensors").is_file()  # a standard CLIPModel directory
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "results.md").is_file()
    assert list((out / "instruct" / "logs").rglob("events.out.tfevents*"))  # TensorBoard, offline
    chat = VLMChat.from_pretrained(summary["final"])
    assert chat.config.vision.name_or_path == "vision"  # the self-trained tower travels with the checkpoint
    assert isinstance(chat.generate(red_circle, "What color is the shape?", max_new_tokens=4), str)
    # Every stage's loss went down.
    for stage in ("contrastive", "pretrain", "instruct", "dpo"):
        rows = [json.loads(x) for x in (out / stage / "train_log.jsonl").read_text().splitlines()]
        assert rows[-1]["loss"] < rows[0]["loss"], stage
