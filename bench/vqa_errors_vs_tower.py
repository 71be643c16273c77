"""Diagnostic: are a VLM's easy-VQA errors on images its frozen stage-0 tower cannot classify, or on images it can?

    vlm-chat eval vqa --full --output runs/demo/eval/vqa_full.json
    python -m bench.vqa_errors_vs_tower --vision vlm_chat/demo_model/vision --vqa runs/demo/eval/vqa_full.json

The tower's own zero-shot classifier (its pooled, last-layer embedding against "A red circle." ... for easy-VQA's 24
classes; the prompt ``vlm-chat eval encoder`` uses) is run on every test image whose questions fix its colour and shape
(888 of 1,000). Each VQA error of the ``--vqa`` files (``--output`` of ``vlm-chat eval vqa``) is then counted as on an
image the tower gets wrong, on one it gets right, or on one without a label. Errors on images the tower classifies
right are information the tower has in its final embedding but the mapper + LLM did not use. What was measured:
docs/training.md, "More balanced steps, and where the errors are".
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tower_wrong(vision: str, items: list[tuple[str, str]], class_names: list[str], template: str) -> set[str]:
    """Image paths of ``items`` (``(path, class name)``) whose most similar class prompt is not their class."""
    from vlm_chat.eval import evaluate_encoder

    result = evaluate_encoder(
        vision, class_items=items, class_names=class_names, class_template=template, return_predictions=True
    )
    return {path for (path, name), guess in zip(items, result["zero_shot_predictions"]) if guess != name}


def split_errors(predictions: list[dict], labelled: set[str], wrong: set[str]) -> dict[str, int]:
    """Counts of a ``vlm-chat eval vqa --output`` file's wrong answers by what the tower makes of their image."""
    errors = [p for p in predictions if not p["correct"]]
    return {
        "questions": len(predictions),
        "errors": len(errors),
        "error_images": len({p["image"] for p in errors}),
        "errors_on_tower_wrong_images": sum(p["image"] in wrong for p in errors),
        "errors_on_tower_right_images": sum(p["image"] in labelled and p["image"] not in wrong for p in errors),
        "errors_on_unlabelled_images": sum(p["image"] not in labelled for p in errors),
        "tower_wrong_images_with_errors": len({p["image"] for p in errors} & wrong),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.vqa_errors_vs_tower", description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="vlm_chat/demo_model/vision", help="The stage-0 CLIP/SigLIP directory.")
    parser.add_argument("--vqa", nargs="+", required=True, help="`vlm-chat eval vqa --output` JSON file(s).")
    parser.add_argument("--limit", type=int, default=None, help="Classify only the first N labelled images (tests).")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from vlm_chat.datasets import easyvqa

    items = easyvqa.labelled_images("test")[: args.limit]
    wrong = tower_wrong(args.vision, items, list(easyvqa.CLASS_NAMES), easyvqa.ZERO_SHOT_TEMPLATE)
    labelled = {path for path, _ in items}
    result = {"vision": args.vision, "labelled_images": len(items), "tower_wrong_images": len(wrong), "vqa": {}}
    for name in args.vqa:
        try:
            predictions = json.loads(Path(name).read_text())["predictions"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: --vqa {name}: not a `vlm-chat eval vqa --output` file ({err})") from err
        result["vqa"][name] = split_errors(predictions, labelled, wrong)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
