"""`python train/quickstart.py --tiny`: stages 0 -> 3 and the evaluation, end to end, on tiny random models."""

import json
import subprocess
import sys
from pathlib import Path

from vlm_chat import VLMChat

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_quickstart_runs_all_stages(tmp_path, red_circle):
    out = tmp_path / "qs"
    command = [sys.executable, str(ROOT / "train" / "quickstart.py"), "--tiny", "--output", str(out),
               "--set", "pretrain.model.mapper.pool=1",  # vlm_chat/recipes/quickstart/pretrain.yaml says 2
               "--set", "data.easyvqa_balance=true",  # no easy-VQA in --tiny: only recorded
               "--set", "instruct.independent_turns=true"]  # a DataArgs key no quickstart YAML holds
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["overrides"] == ["pretrain.model.mapper.pool=1", "data.easyvqa_balance=true",
                                    "instruct.independent_turns=true"]
    assert set(summary["results"]) == {"instruct", "dpo"}
    vqa = summary["results"]["dpo"]
    kinds = [k for k in vqa if k.startswith("vqa_") and k not in ("vqa_accuracy", "vqa_n")]
    assert kinds and vqa["vqa_n"] == 24  # per question type (shapes world: count, color, ...) on eval.vqa_questions
    # The table's numbers are what a user's own `vlm-chat eval` gets on the same questions with the same model.
    cli = subprocess.run([sys.executable, "-m", "vlm_chat.cli", "eval", "vqa", "--model", summary["final"], "--data",
                          str(out / "data" / "shapes_eval" / "vqa.jsonl"), "--limit", "24",
                          "--output", str(tmp_path / "vqa.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    mine = json.loads((tmp_path / "vqa.json").read_text())
    assert (mine["n"], mine["accuracy"]) == (24, vqa["vqa_accuracy"])
    assert {f"vqa_{t.replace('/', '_')}": v["accuracy"] for t, v in mine["by_type"].items()} == {k: vqa[k] for k in kinds}
    # Every shapes-world question type is reported for both models; the object recall/precision with the captions.
    from vlm_chat.datasets import shapes

    types = {qa.qtype for s in shapes.generate_scenes(3, seed=shapes.TEST_SEED, image_size=32) for qa in shapes.qa_pairs(s)}
    for stage in ("instruct", "dpo"):
        assert {f"shapes_{t}" for t in types} <= set(summary["results"][stage]), stage
    assert {"shapes_caption_recall", "shapes_caption_precision"} <= set(vqa)
    assert "shapes_caption_recall" not in summary["results"]["instruct"]
    for stage in ("contrastive", "pretrain", "instruct", "dpo"):
        assert (out / stage / "final").is_dir() and (out / stage / "train_log.jsonl").is_file()
    assert (out / "contrastive" / "final" / "model.safetensors").is_file()  # a standard CLIPModel directory
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "results.md").is_file()
    assert list((out / "instruct" / "logs").rglob("events.out.tfevents*"))  # TensorBoard, offline
    chat = VLMChat.from_pretrained(summary["final"])
    assert chat.config.mapper.pool == 1  # --set reached stage 1, and stages 2-3 kept it
    assert chat.config.vision.name_or_path == "vision"  # the self-trained tower travels with the checkpoint
    assert isinstance(chat.generate(red_circle, "What color is the shape?", max_new_tokens=4), str)
    # Stages 0-2: the loss went down. DPO starts from a frozen copy of the instruct adapter as its reference, so its
    # first loss is exactly ln 2 (that its loss falls on a fixed batch is tests/test_stages.py's job).
    for stage in ("contrastive", "pretrain", "instruct", "dpo"):
        rows = [json.loads(x) for x in (out / stage / "train_log.jsonl").read_text().splitlines()]
        if stage == "dpo":
            assert abs(rows[0]["loss"] - 0.693147) < 1e-4, rows[0]
        else:
            assert rows[-1]["loss"] < rows[0]["loss"], stage
    # The run is packaged the way the demo model is: fp16 adapter + mapper, the whole CLIPModel as vision/.
    shipped = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ship_demo.py"), "--run", str(out), "--out", str(shipped)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["stage0"]["zero_shot_n"] == 48  # eval.zero_shot_images of --tiny: easy-VQA test images, one each
    demo = VLMChat.from_pretrained(shipped)
    assert demo.config.lm.name_or_path == chat.config.lm.name_or_path and demo.config.system_prompt == ""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPModel

    assert all(v.dtype == torch.float16 for v in load_file(shipped / "adapter" / "adapter_model.safetensors").values())
    CLIPModel.from_pretrained(shipped / "vision")  # the dual encoder, for `vlm-chat eval encoder`
    batch = chat._inputs([red_circle], ["What color is the shape?"], [None], reserve=0)
    with torch.no_grad():
        a = chat.model(**batch).logits
        b = demo.model(**demo._inputs([red_circle], ["What color is the shape?"], [None], reserve=0)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # fp16 storage of the trained weights only
    card = (shipped / "README.md").read_text()
    assert "Reproduce" in card
    # The card's command trains this run under today's configs: what differs from the YAMLs is spelled out.
    assert "--set pretrain.model.mapper.pool=1" in card and "--set instruct.max_steps=12" in card
    assert "--set data.easyvqa_balance=true" in card and "--set instruct.independent_turns=true" in card
    assert f"MLP over all patches (no pooling) -> {demo.config.num_image_tokens} visual tokens" in card
    # A run made of more than one quickstart call records its commands in recipe.sh; the card shows those instead.
    (out / "recipe.sh").write_text("python train/quickstart.py --output X\n\npython train/instruct.py --init_from Y\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ship_demo.py"), "--run", str(out), "--out",
                           str(shipped), "--card-only"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (shipped / "README.md").read_text()
    assert "python train/quickstart.py --output X\npython train/instruct.py --init_from Y\n" in card
    assert "--set pretrain.model.mapper.pool=1" not in card

    # A run stopped mid-stage (here: instruct killed after its step-6 checkpoint) continues where it stopped when the
    # same command runs again, and ends with the weights the uninterrupted run trained, bit for bit.
    import shutil

    weights = {f.relative_to(out): f.read_bytes() for f in (out / "instruct" / "final").rglob("*.safetensors")}
    assert weights
    assert sorted(d.name for d in (out / "instruct" / "checkpoints").iterdir()) == ["step-12", "step-6"]
    for gone in (out / "instruct" / "final", out / "instruct" / "checkpoints" / "step-12", out / "dpo"):
        shutil.rmtree(gone)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "instruct: resuming the unfinished stage from" in proc.stderr and "pretrain: reusing" in proc.stderr
    assert "step-6 at step 6" in proc.stderr  # the engine's word that it went on from there, not from step 0
    assert {f.relative_to(out): f.read_bytes() for f in (out / "instruct" / "final").rglob("*.safetensors")} == weights
    assert (out / "dpo" / "final").is_dir()


def test_bad_set_names_the_expected_form(tmp_path):
    for bad in ("mapper_pool=1", "data.image_size=32", "eval.nonsense=1", "model.x=1"):
        proc = subprocess.run([sys.executable, str(ROOT / "train" / "quickstart.py"), "--tiny", "--output",
                               str(tmp_path), "--set", bad], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and bad in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "data").exists()  # refused before any work


def test_recipes_ship_as_package_data_and_parse():
    """The quickstart reads its stage YAMLs from the installed package (a non-editable install has no configs/)."""
    import tomllib

    import vlm_chat
    from vlm_chat.training import load_contrastive_config, load_stage_config
    from vlm_chat.training.quickstart import CONFIG_DIR

    assert CONFIG_DIR.parents[1] == Path(vlm_chat.__file__).resolve().parent
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "recipes/**/*.yaml" in package_data["vlm_chat"]
    assert load_contrastive_config(CONFIG_DIR / "contrastive.yaml").model.model_type == "clip"
    pre = load_stage_config("pretrain", CONFIG_DIR / "pretrain.yaml")
    assert (pre.model.mapper.pool, pre.model.lm.max_length, pre.model.system_prompt) == (2, 256, "")
    for stage in ("instruct", "dpo"):
        assert load_stage_config(stage, CONFIG_DIR / f"{stage}.yaml").init_from.endswith("/final")
