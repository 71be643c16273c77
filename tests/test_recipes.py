"""Recipes as data: `quickstart.py --recipe NAME|FILE` reads settings on top of the stage YAMLs, and the demo's card
names the recipe that trained it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm_chat.training import load_contrastive_config, load_stage_config
from vlm_chat.training.quickstart import CONFIG_DIR, RECIPE_DIR, flat_settings, recipe_settings

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = [sys.executable, str(ROOT / "train" / "quickstart.py")]


def _ship_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_demo", ROOT / "train" / "ship_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_recipe_items_read_back_as_its_yaml():
    items = recipe_settings("demo")
    data = yaml.safe_load((RECIPE_DIR / "demo.yaml").read_text())
    expected = {f"{section}.{k}": v for section, body in data.items() for k, v in flat_settings(body).items()}
    parsed = {item.partition("=")[0]: yaml.safe_load(item.partition("=")[2]) for item in items}
    assert parsed == expected
    assert "pretrain.model.vision.drop_cls=false" in items and "data.shapes_images=6000" in items
    assert recipe_settings(str(RECIPE_DIR / "demo.yaml")) == items  # a path works as well as a name


def test_demo_recipe_settings_are_ones_the_stages_accept():
    """A typo in a recipe is caught here, not an hour into a run: each stage's parser takes its settings."""
    by_stage: dict[str, dict] = {}
    for item in recipe_settings("demo"):
        key, _, value = item.partition("=")
        stage, _, rest = key.partition(".")
        by_stage.setdefault(stage, {})[rest] = yaml.safe_load(value)
    assert load_contrastive_config(CONFIG_DIR / "contrastive.yaml", by_stage["contrastive"]).train.max_steps == 3000
    pre = load_stage_config("pretrain", CONFIG_DIR / "pretrain.yaml", by_stage["pretrain"])
    assert (pre.model.mapper.pool, pre.model.vision.drop_cls, pre.model.lm.max_length) == (1, False, 512)
    steps = {stage: load_stage_config(stage, CONFIG_DIR / f"{stage}.yaml", by_stage[stage]).train.max_steps
             for stage in ("instruct", "dpo")}
    assert steps == {"instruct": 420, "dpo": 60}


@pytest.mark.parametrize(
    ("recipe", "text", "message"),
    [
        ("nosuch", None, "shipped recipes: demo"),
        ("bad.yaml", "- a list\n", "a recipe is a mapping"),
        ("bad.yaml", "stage9:\n  max_steps: 1\n", "section 'stage9'"),
        ("bad.yaml", "data:\n  image_size: 32\n", "the data settings are"),
    ],
)
def test_bad_recipe_is_refused_naming_it(tmp_path, recipe, text, message):
    if text is not None:
        (tmp_path / recipe).write_text(text)
        recipe = str(tmp_path / recipe)
    proc = subprocess.run([*QUICKSTART, "--tiny", "--recipe", recipe, "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and Path(recipe).name in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work


def test_card_names_the_recipe_and_reports_every_shapes_type(tmp_path):
    ship_demo = _ship_demo()
    from huggingface_hub import ModelCard

    run, out = tmp_path / "run", tmp_path / "out"
    (run / "eval").mkdir(parents=True)
    out.mkdir()
    # The model directory's config is all the card reads of it: the shipped demo's will do.
    (out / "config.json").write_text((ROOT / "vlm_chat" / "demo_model" / "config.json").read_text())
    # A run launched with the recipe's settings spelled out as --set items is that recipe.
    summary = {"scale": 1, "overrides": recipe_settings("demo"), "seconds": {"total": 6000}}
    (run / "results.json").write_text(json.dumps(summary))
    shapes = {"accuracy": 0.9, "n": 30, "n_scenes": 3, "caption_objects": {"recall": 0.8, "precision": 0.7},
              "by_type": {"colour": {"accuracy": 0.95, "n": 20}, "count_attribute": {"accuracy": 0.8, "n": 10}}}
    (run / "eval" / "shapes.json").write_text(json.dumps(shapes))
    pope = {"overall": {"f1": 0.9, "accuracy": 0.9, "precision": 0.9, "recall": 0.9, "yes_ratio": 0.5, "n": 4},
            "by_category": {"adversarial": {"f1": 0.8, "accuracy": 0.75, "n": 2}}}
    (run / "eval" / "pope.json").write_text(json.dumps(pope))
    text = ship_demo.card(run, out)
    assert f"python train/quickstart.py --recipe demo --output {run}   # from nothing: 100 min here" in text
    assert "--set" not in text.split("## Reproduce")[1]
    assert "| ... count of a colour or shape (n=10) | 0.8000 |" in text and "| ... colour (n=20) | 0.9500 |" in text
    assert "(recall) / named objects that are present (precision) | 0.8000 / 0.7000 |" in text
    assert "| ... POPE adversarial: F1 / accuracy (n=2) | 0.8000 / 0.7500 |" in text
    data = ModelCard(text).data  # Hub front matter, as on every checkpoint's card
    assert data.pipeline_tag == "image-text-to-text" and data.license == "apache-2.0"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in data.base_model
    # Given with --recipe, extra --set items follow it; an unnamed set of --set items stays spelled out.
    summary.update(recipe="demo", overrides=["dpo.max_steps=30"])
    (run / "results.json").write_text(json.dumps(summary))
    assert f"--recipe demo --output {run} --set dpo.max_steps=30" in ship_demo.card(run, out)
    summary.update(recipe=None, overrides=["dpo.max_steps=30"])
    (run / "results.json").write_text(json.dumps(summary))
    assert "--recipe" not in ship_demo.card(run, out)
