"""``vlm-chat eval TASK``: build the evaluation set, run the model on it, print and write the results.

The command line (``vlm_chat.cli``) parses the arguments and calls :func:`run_eval`; the sets and runners are here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import vlm_chat
from vlm_chat.serving import UsageError, load_model

logger = logging.getLogger(__name__)

#: Result keys that hold one entry per sample: written by ``--output``, left out of the printed summary.
PER_SAMPLE_KEYS = ("predictions", "captions", "cider_per_image")
#: Default number of shapes-world scenes: ``eval shapes`` (150 scenes: ~2,400 questions) and the other tasks.
DEFAULT_SCENES = {"shapes": 150, "pope": 100, "captions": 100, "encoder": 100}


def shapes_seed(split: str) -> int:
    """The shapes-world seed of an evaluation split: ``"test"`` (final reports) or ``"val"`` (model choices)."""
    from vlm_chat.datasets import shapes

    seeds = {"test": shapes.TEST_SEED, "val": shapes.VALIDATION_SEED}
    if split not in seeds:
        raise UsageError(f"--split chooses among the default easy-VQA and shapes-world sets; --split {split} applies to "
                         "`eval vqa` only (shapes-world scenes have test and val)")
    return seeds[split]


def eval_samples(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The samples of ``vlm-chat eval TASK`` (vqa, pope, captions) and extra keywords for its ``evaluate_*``."""
    from vlm_chat.datasets import easyvqa, shapes
    from vlm_chat.eval import load_eval_jsonl

    required = {"vqa": ("image", "question", "answer"), "pope": ("image", "question", "label")}
    extra: dict[str, Any] = {}
    if args.split != "test" and args.data is not None:
        raise UsageError("--split chooses among the default easy-VQA and shapes-world sets: it does not apply with --data")
    if args.data is not None:
        rows = load_eval_jsonl(args.data, required=required.get(args.task, ("image", "caption")))
        if args.task == "captions":  # one row per reference caption: gather each image's references
            refs: dict[str, list[str]] = {}
            for row in rows:
                refs.setdefault(row["image"], []).append(row["caption"])
            rows = [{"image": image, "references": r} for image, r in refs.items()]
    elif args.task == "vqa":
        if args.paraphrase:
            rows = easyvqa.paraphrase_questions(split=args.split)
        else:
            rows = easyvqa.load_split(args.split) if args.full else easyvqa.quick_eval_subset(split=args.split)
        extra["vocabulary"] = easyvqa.answer_vocabulary()  # so a colour answered to a yes/no question is judged
    else:
        scenes = shapes.generate_scenes(args.scenes or DEFAULT_SCENES[args.task], seed=shapes_seed(args.split))
        images = [scene.render() for scene in scenes]
        if args.task == "pope":
            rows = [{**q, "image": images[q["scene_index"]]} for q in shapes.pope_questions(scenes)]
        else:
            rows = [
                {"image": img, "references": shapes.reference_captions(scene, detailed=args.detailed)}
                for img, scene in zip(images, scenes)
            ]
    if not rows:
        raise UsageError(f"{args.data or 'the evaluation set'} holds no samples")
    return rows[: args.limit], extra


def run_eval(args: argparse.Namespace) -> int:
    """Run ``vlm-chat eval`` with parsed arguments: print the metrics as JSON, write everything to ``--output``.

    Returns:
        The exit status (0).

    Raises:
        UsageError: An option that does not apply to the task.
    """
    from vlm_chat import eval as evaluation

    if args.task == "encoder":
        return run_eval_encoder(args)
    if args.task == "shapes":
        if args.data is not None:
            raise UsageError("eval shapes generates its scenes; --data is for vqa, pope and captions")
        seed = shapes_seed(args.split)
        samples, extra = None, {}
    else:
        samples, extra = eval_samples(args)
    chat = load_model(args.model)
    kwargs = {"batch_size": args.batch_size, **extra}
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    data: Any = args.data
    if args.task == "shapes":
        from vlm_chat.datasets import shapes

        n_scenes = args.scenes or DEFAULT_SCENES["shapes"]
        scenes = shapes.generate_scenes(n_scenes, seed=seed)
        data = {"split": args.split, "seed": seed, "scenes": n_scenes}
        result = evaluation.evaluate_shapes(chat, scenes, limit=args.limit, captions=not args.no_captions, **kwargs)
    elif args.task == "vqa":
        result = evaluation.evaluate_vqa(chat, samples, **kwargs)
    elif args.task == "pope":
        result = evaluation.evaluate_pope(chat, samples, **kwargs)
    else:
        result = evaluation.evaluate_captions(chat, samples, detailed=args.detailed, **kwargs)
    result = {"task": args.task, "model": args.model or vlm_chat.DEMO_MODEL, "data": data, **result}
    _write(result, args.output)
    print(json.dumps({k: v for k, v in result.items() if k not in PER_SAMPLE_KEYS}, indent=2))
    return 0


def run_eval_encoder(args: argparse.Namespace) -> int:
    """Zero-shot classification on easy-VQA test images and image<->text retrieval on unseen shapes-world scenes."""
    from vlm_chat import eval as evaluation
    from vlm_chat.datasets import easyvqa, shapes

    if args.split != "test":
        raise UsageError("eval encoder reads easy-VQA's test images and the test scenes; it has no --split")
    path = Path(args.model or vlm_chat.DEMO_ENCODER)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a CLIP/SigLIP directory (no config.json); pass --model DIR of a stage-0 run")
    classes = easyvqa.labelled_images("test")[: args.limit]
    scenes = shapes.generate_scenes(args.scenes or DEFAULT_SCENES["encoder"], seed=shapes.TEST_SEED)
    captions = [(scene.render(), shapes.reference_captions(scene)[0]) for scene in scenes]
    result = evaluation.evaluate_encoder(
        str(path),
        class_items=classes,
        class_names=easyvqa.CLASS_NAMES,
        class_template=easyvqa.ZERO_SHOT_TEMPLATE,
        caption_items=captions,
    )
    result = {"task": "encoder", "model": str(path), "class_template": easyvqa.ZERO_SHOT_TEMPLATE, **result}
    _write(result, args.output)
    print(json.dumps(result, indent=2))
    return 0


def _write(result: dict[str, Any], output: str | None) -> None:
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        logger.info("wrote %s", out)
