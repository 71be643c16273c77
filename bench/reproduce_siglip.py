"""Reproduce, small-scale: SigLIP's sigmoid loss vs CLIP's softmax loss (and triplet) at several batch sizes.

    python -m bench.reproduce_siglip [--quick] [--output DIR] [--batches 16,64,256] [--examples N | --hold steps]

Claim (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343): the sigmoid loss is
better than the softmax (InfoNCE) loss at small batch sizes, and the two meet as the batch grows.

Every run is an ordinary stage-0 run (``vlm_chat.training.run_contrastive``, ``vlm_chat/recipes/quickstart/contrastive.yaml``)
on the quickstart's captions (shapes world + easy-VQA train), with only the loss, the batch size and the step count
changed. The architecture is the same ``CLIPModel`` for all three losses, so the loss is the only difference (the
SigLIP loss gets its learned bias from ``DualEncoder``). Each batch size sees the same number of training *examples*
(``--examples``; steps = examples / batch), as the paper's batch-size study holds examples seen fixed; ``--hold steps``
gives every batch size the same step count instead. Every encoder is then scored by
``vlm_chat.eval.evaluate_encoder``: zero-shot accuracy over easy-VQA's 24 colour x shape test classes and
image<->text R@1/R@5 on held-out shapes-world scenes.

Writes ``OUTPUT/results.json`` (every number, the settings and the command) and prints a markdown table. A finished
run (``OUTPUT/runs/<loss>-b<batch>/result.json``) is reused unless ``--force``. Measured: docs/reproductions.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline; never wait on the hub

logger = logging.getLogger("reproduce_siglip")


LOSSES = ("clip", "siglip", "triplet")
#: Default examples seen per run: the quickstart's stage 0 (500 steps x batch 64).
FULL_EXAMPLES = 32_000
#: --quick: 40% of that (batch 256: 50 steps, 64: 200, 16: 800), about 1.5 min per run on 2 free cores.
QUICK_EXAMPLES = 12_800
#: Data of the quickstart (``vlm_chat.training.quickstart.FULL``): 1,000 shapes scenes + easy-VQA train, 100 held out.
FULL_DATA = {"shapes_images": 1000, "shapes_eval_images": 100, "image_size": 64, "easyvqa": True}
#: --tiny (tests): a few 32-px shapes scenes and a tiny tower, seconds per run.
TINY_DATA = {"shapes_images": 24, "shapes_eval_images": 6, "image_size": 32, "easyvqa": False}
TINY_MODEL = {"image_size": 32, "vision_hidden_size": 32, "vision_layers": 1, "text_hidden_size": 32, "text_layers": 1,
              "projection_dim": 32}
TINY_ZERO_SHOT_IMAGES = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reproduce_siglip", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/reproduce_siglip", help="Run directory (data, encoders, results).")
    p.add_argument("--data", default=None,
                   help="Directory holding (or to receive) data/shapes_train, data/shapes_eval, data/easyvqa_train "
                        "as the quickstart writes them, e.g. a quickstart run directory; default: --output. "
                        "Existing data is only read.")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EXAMPLES} examples per run, not {FULL_EXAMPLES}.")
    p.add_argument("--tiny", action="store_true", help="Tiny data and tower (seconds; for tests).")
    p.add_argument("--losses", default=",".join(LOSSES), help="Comma-separated subset of clip,siglip,triplet.")
    p.add_argument("--batches", default="16,64,256", help="Comma-separated batch sizes.")
    p.add_argument("--hold", choices=("examples", "steps"), default="examples",
                   help="What every batch size shares: the examples seen (default) or the step count.")
    p.add_argument("--examples", type=int, default=None, help="Examples seen per run with --hold examples.")
    p.add_argument("--steps", type=int, default=500, help="Steps per run with --hold steps.")
    p.add_argument("--learning_rate", type=float, default=None, help="Peak learning rate (default: the config's).")
    p.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="Warmup as a fraction of each run's steps (a fixed step count would favour long runs).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero_shot_images", type=int, default=None,
                   help="Use the first N of easy-VQA's 888 labelled test images (default: all).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores the load average leaves free, at least 1; on a busy "
                        "2-core machine 2 threads ran a stage-0 step 10x slower than 1).")
    p.add_argument("--force", action="store_true", help="Retrain runs that already have a result.")
    args = p.parse_args(argv)
    args.losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    if not args.losses or set(args.losses) - set(LOSSES):
        p.error(f"--losses must be a subset of {','.join(LOSSES)}, got {args.losses}")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches must be positive integers")
    if args.examples is None:
        args.examples = QUICK_EXAMPLES if args.quick else FULL_EXAMPLES
    if args.tiny and args.zero_shot_images is None:
        args.zero_shot_images = TINY_ZERO_SHOT_IMAGES
    return args


def run_steps(args: argparse.Namespace, batch: int) -> int:
    """Optimizer steps of one run: the same examples (rounded to whole steps) or the same steps for every batch."""
    if args.hold == "steps":
        return args.steps
    return max(1, round(args.examples / batch))


def prepare(args: argparse.Namespace, out: Path) -> tuple[Path, Path, list[tuple[str, str]], list[tuple[str, str]]]:
    """Training captions (merged into one file under ``out``), their image folder, zero-shot and retrieval items."""
    from vlm_chat import eval as evaluation
    from vlm_chat.datasets import easyvqa
    from vlm_chat.training.quickstart import _merge_jsonl, prepare_data

    data_root = Path(args.data) if args.data else out
    data = prepare_data(data_root, TINY_DATA if args.tiny else FULL_DATA)
    captions = _merge_jsonl(data["captions"], out / "captions.jsonl")
    classes = easyvqa.labelled_images("test")[: args.zero_shot_images]
    first: dict[str, str] = {}
    for row in evaluation.load_eval_jsonl(data["eval"] / "captions.jsonl", required=("image", "caption")):
        # The first reference of a held-out scene is its short caption, the form the encoder is trained on.
        first.setdefault(row["image"], row["caption"])  # absolute path (load_eval_jsonl)
    # The merged file lives in ``out`` but its (absolute) image paths under the data root: the loader refuses paths
    # outside the image folder, so name the folder that really holds them.
    return captions, (data_root / "data").resolve(), classes, list(first.items())


def train_one(args: argparse.Namespace, loss: str, batch: int, captions: Path, images: Path, run_dir: Path
              ) -> dict[str, Any]:
    """One stage-0 run through the library's stage script; returns its step count, wall time and last loss."""
    from vlm_chat.training.quickstart import run_contrastive_recipe

    steps = run_steps(args, batch)
    overrides: dict[str, Any] = {
        "train_file": captions,
        "image_folder": images,
        "output_dir": run_dir,
        "model_type": "clip",  # one architecture for every loss: the loss is the only variable
        "loss": loss,
        "same_caption_positive": True,  # the default, stated: identical captions are positives for every loss
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "warmup_steps": 0,  # 0 lets warmup_ratio decide, so every run warms up over the same share of its steps
        "warmup_ratio": args.warmup_ratio,
        "save_steps": 0,  # only final/: checkpoints would cost time and disk for nothing here
        "logging_steps": max(1, steps // 5),
        "report_to": "none",
        "disable_tqdm": True,
        "seed": args.seed,
    }
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    if args.tiny:
        overrides.update(TINY_MODEL)
    start = time.perf_counter()
    result = run_contrastive_recipe(overrides)
    seconds = time.perf_counter() - start
    history = result.history
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())  # what the run really used (config + overrides)
    tail = history[-max(1, len(history) // 10):]  # the last 10% of steps: a less noisy "final" training loss
    return {"steps": steps, "examples": steps * batch, "train_s": seconds,
            "final_train_loss": sum(r["loss"] for r in tail) / len(tail), "final_dir": str(result.final_dir),
            "learning_rate": resolved["learning_rate"], "warmup_steps_resolved": round(args.warmup_ratio * steps)}


def evaluate_one(encoder_dir: str, classes, retrieval) -> dict[str, Any]:
    """Zero-shot accuracy (easy-VQA test classes) and retrieval R@k (held-out shapes scenes) of one encoder."""
    from vlm_chat.datasets import easyvqa
    from vlm_chat.eval import evaluate_encoder

    r = evaluate_encoder(encoder_dir, class_items=classes, class_names=easyvqa.CLASS_NAMES,
                         class_template=easyvqa.ZERO_SHOT_TEMPLATE, caption_items=retrieval)
    keys = ("zero_shot_accuracy", "zero_shot_n", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "retrieval_n_images",
            "retrieval_n_texts")
    return {k: r[k] for k in keys}


def table(runs: list[dict[str, Any]], losses: list[str], batches: list[int]) -> str:
    """Markdown: one row per batch size, zero-shot accuracy and R@1 (image->text / text->image) per loss."""
    by = {(r["loss"], r["batch"]): r for r in runs}
    head = ["batch", "steps"] + [f"{loss} zero-shot" for loss in losses] + [f"{loss} R@1 i2t / t2i" for loss in losses]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in batches:
        row = [str(b), str(by[(losses[0], b)]["steps"])]
        row += [f"{by[(loss, b)]['zero_shot_accuracy']:.3f}" for loss in losses]
        row += [f"{by[(loss, b)]['i2t_r1']:.3f} / {by[(loss, b)]['t2i_r1']:.3f}" for loss in losses]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| loss | batch | steps | examples | final train loss | train s |", "|---|---|---|---|---|---|"]
    for b in batches:
        for loss in losses:
            r = by[(loss, b)]
            lines.append(f"| {loss} | {b} | {r['steps']} | {r['examples']} | {r['final_train_loss']:.4f} | "
                         f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from bench import run as bench_run

    threads, why = (args.threads, "--threads") if args.threads else bench_run.auto_threads()
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s)", threads, why)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    captions, images, classes, retrieval = prepare(args, out)
    n_rows = sum(1 for line in captions.read_text().splitlines() if line.strip())
    logger.info("%d training captions; zero-shot on %d test images, retrieval on %d held-out scenes",
                n_rows, len(classes), len(retrieval))
    runs = []
    for batch in args.batches:  # all losses of one batch size back to back, so machine drift hits them alike
        for loss in args.losses:
            run_dir = out / "runs" / f"{loss}-b{batch}"
            saved = run_dir / "result.json"
            if saved.is_file() and not args.force:
                record = json.loads(saved.read_text())
                if record.get("steps") == run_steps(args, batch) and record.get("seed") == args.seed:
                    logger.info("%s batch %d: reusing %s (pass --force to retrain)", loss, batch, saved)
                    runs.append(record)
                    continue
            logger.info("%s loss, batch %d: %d steps", loss, batch, run_steps(args, batch))
            record = {"loss": loss, "batch": batch, "seed": args.seed,
                      **train_one(args, loss, batch, captions, images, run_dir)}
            record.update(evaluate_one(record["final_dir"], classes, retrieval))
            logger.info("%s batch %d: zero-shot %.3f, R@1 i2t %.3f t2i %.3f (%.0f s)", loss, batch,
                        record["zero_shot_accuracy"], record["i2t_r1"], record["t2i_r1"], record["train_s"])
            saved.write_text(json.dumps(record, indent=2) + "\n")
            runs.append(record)
    summary = {
        "claim": "sigmoid (SigLIP) loss beats softmax (CLIP) loss at small batch sizes (arXiv:2303.15343)",
        "command": "python -m bench.reproduce_siglip " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("force",)},
        "training_captions": n_rows,
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - t0,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(runs, args.losses, args.batches)
    (out / "results.md").write_text(md + "\n")
    print(md)  # the one thing this script exists to show
    return summary


if __name__ == "__main__":
    main()
