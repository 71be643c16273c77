"""Reproduce, small-scale: a few "summary tokens" vs all patch tokens as the LLM's visual input.

    python -m bench.reproduce_summary_tokens [--quick] [--output DIR] [--vision DIR] [--instruct_steps N]

Claim (Vallaeys et al. 2024, "Improved Baselines for Data-efficient Perceptual Augmentation of LLMs" / DePALM,
arXiv:2403.13499): pooling the encoder's tokens into a few summary tokens before the LLM trains about 4x faster than
feeding all of them, with (near) the same accuracy.

Three VLMs that differ only in the mapper: ``mlp`` over all 64 patch tokens (``mapper_pool 1``: 64 visual tokens),
``perceiver`` and ``qformer`` with 16 learned queries (16 visual tokens). Same frozen stage-0 CLIP tower, same
SmolLM2-135M-Instruct + LoRA, same data, seed, steps and learning rates. Each is trained by the library's own stage
runs (``vlm_chat.training.run_stage``: optional stage 1 on captions, then stage 2 on conversations, with the
``configs/quickstart`` YAMLs and only steps/sizes overridden) and scored on a fixed subset of easy-VQA's test split
(``vlm_chat.eval.evaluate_vqa``, answer = first vocabulary word of the response).

Step time is measured apart from training, in one process, on identical batches: one optimizer step (forward, backward,
clip, AdamW; ``bench/run.py``'s ``train_step``) per mapper per round, the order alternating each round
(``bench/run.py``'s ``paired``), each mapper summarised by its fastest round. Absolute times on a shared machine drift,
so the ratio to the MLP is the number to read. It is measured for training conversations cut to 4 QA turns per image and
to one QA turn, because the share of visual tokens in the sequence decides how much fewer of them can save.
The frozen tower's features are cached (as training does), so the step is mapper + LLM; the tower is the same for all.

Writes ``OUTPUT/results.json`` and prints a markdown table. Finished training runs (``OUTPUT/<mapper>/instruct/final``)
and their scores are reused unless ``--force``. What was measured: docs/reproductions.md.
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

logger = logging.getLogger("reproduce_summary_tokens")

MAPPERS = ("mlp", "perceiver", "qformer")
#: The quickstart's data (``vlm_chat.training.quickstart.FULL``) and, for tests, its tiny variant.
FULL_DATA = {"shapes_images": 1000, "shapes_eval_images": 100, "image_size": 64, "easyvqa": True}
TINY_DATA = {"shapes_images": 24, "shapes_eval_images": 6, "image_size": 32, "easyvqa": False}
TINY_TOWER = {"image_size": 32, "vision_hidden_size": 32, "vision_layers": 1, "text_hidden_size": 32, "text_layers": 1,
              "projection_dim": 32, "max_steps": 4, "per_device_train_batch_size": 8}
#: (full, --quick, --tiny) sizes.
SIZES = {
    "pretrain_steps": (30, 0, 1),
    "instruct_steps": (60, 30, 2),
    "batch": (8, 4, 2),
    "vqa_questions": (300, 200, 4),
    "timing_rounds": (3, 2, 1),
}
#: QA turns per sample in the "packed" timing batch (training rows keep all their turns, 10-25 per image).
TIMING_TURNS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reproduce_summary_tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="runs/reproduce_summary_tokens", help="Run directory.")
    p.add_argument("--data", default=None,
                   help="Directory holding (or to receive) the quickstart's data/ folders, e.g. a quickstart run "
                        "directory; default: --output. Existing data is only read.")
    p.add_argument("--quick", action="store_true", help="Fewer steps and questions (see SIZES).")
    p.add_argument("--tiny", action="store_true", help="Tiny data and tower (seconds, for tests); pass a tiny --lm.")
    p.add_argument("--vision", default=None,
                   help="Frozen CLIP/SigLIP tower (directory or hub id); default: train the quickstart's stage 0 "
                        "(configs/quickstart/contrastive.yaml, 500 steps) into OUTPUT/tower.")
    p.add_argument("--lm", default=None, help="The LLM (default: the quickstart's, SmolLM2-135M-Instruct Q4_1).")
    p.add_argument("--mappers", default=",".join(MAPPERS), help="Comma-separated subset of mlp,perceiver,qformer.")
    p.add_argument("--num_queries", type=int, default=16, help="Summary tokens of perceiver/qformer.")
    p.add_argument("--feature_layer", type=int, default=None,
                   help="Tower hidden state the mapper reads (default: configs/quickstart/pretrain.yaml's, -2).")
    for name, help_ in (("pretrain_steps", "Stage-1 (captions, mapper only) steps; 0 skips stage 1."),
                        ("instruct_steps", "Stage-2 (conversations, mapper + LoRA) steps."),
                        ("batch", "Samples per step in both stages and in the timing."),
                        ("vqa_questions", "easy-VQA test questions (quick_eval_subset) per model."),
                        ("timing_rounds", "Timed rounds per batch shape (after one untimed warm-up round).")):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{help_} Default: {SIZES[name]} (full, quick, tiny).")
    p.add_argument("--max_length", type=int, default=512,
                   help="Longest training sequence in both stages. Above the configs' 256 so that no conversation is "
                        "cut: with 256, 64 visual tokens would leave the MLP model less text than the others.")
    p.add_argument("--mapper_lr", type=float, default=None,
                   help="Stage-2 mapper learning rate (default: instruct.yaml's after a stage 1, pretrain.yaml's "
                        "when stage 1 is skipped, since the mapper then starts untrained).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores the load average leaves free, at least 1; on a busy "
                        "2-core machine 2 threads ran a stage-0 step 10x slower than 1).")
    p.add_argument("--force", action="store_true", help="Retrain and re-score mappers that already have results.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--no_timing", action="store_true",
                      help="Train and score only (e.g. on a GPU machine, whose step times say nothing about a CPU).")
    what.add_argument("--timing_only", action="store_true",
                      help="Time freshly built models only (a step's cost does not depend on the weights' values).")
    args = p.parse_args(argv)
    col = 2 if args.tiny else 1 if args.quick else 0
    for name, values in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, values[col])
    args.mappers = [m.strip() for m in args.mappers.split(",") if m.strip()]
    if not args.mappers or set(args.mappers) - set(MAPPERS):
        p.error(f"--mappers must be a subset of {','.join(MAPPERS)}, got {args.mappers}")
    if args.instruct_steps < 1 or args.batch < 1 or args.timing_rounds < 1:
        p.error("--instruct_steps, --batch and --timing_rounds must be >= 1")
    if args.tiny and not args.lm:
        p.error("--tiny needs --lm (a tiny causal LM directory with a chat template)")
    return args


def _config_value(stage: str, key: str) -> Any:
    """A value of the quickstart recipe's YAML; ``model.lm.lora_r``-style keys reach into its ``model:`` section."""
    import yaml

    from vlm_chat.training.quickstart import CONFIG_DIR

    value = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text())
    for part in key.split("."):
        value = value[part]
    return value


def prepare(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Merged caption and conversation files of the quickstart's data (written under ``out``) and their image folder.

    The merged files hold absolute image paths under the data root, which the loaders accept only inside the named
    image folder; so the folder is the data root's ``data/``, wherever the merged files are.
    """
    from vlm_chat.training.quickstart import _merge_jsonl, prepare_data

    root = Path(args.data) if args.data else out
    data = prepare_data(root, TINY_DATA if args.tiny else FULL_DATA)
    return {"captions": _merge_jsonl(data["captions"], out / "captions.jsonl"),
            "conversations": _merge_jsonl(data["conversations"], out / "conversations.jsonl"),
            "images": (root / "data").resolve()}


def ensure_tower(args: argparse.Namespace, out: Path, captions: Path, images: Path) -> str:
    """The frozen vision tower: ``--vision``, or the quickstart's stage 0 trained here (reused when present)."""
    if args.vision:
        return args.vision
    from vlm_chat.training.quickstart import run_contrastive_recipe

    run_dir = out / "tower"
    if not (run_dir / "final").is_dir() or args.force:
        overrides: dict[str, Any] = {"train_file": captions, "image_folder": images, "output_dir": run_dir,
                                     "seed": args.seed, "report_to": "none", "save_steps": 0}
        if args.tiny:
            overrides.update(TINY_TOWER)
        run_contrastive_recipe(overrides)
    return str(run_dir / "final")


def train_mapper(args: argparse.Namespace, mapper: str, tower: str, data: dict[str, Path], out: Path) -> dict:
    """Stage 1 (optional) and stage 2 for one mapper through ``run_stage``; returns run dirs and wall times."""
    from vlm_chat.training.quickstart import run_stage_recipe

    model = _model_overrides(args, mapper, tower)
    common = {"seed": args.seed, "image_folder": data["images"], "per_device_train_batch_size": args.batch,
              "report_to": "none", "save_steps": 0, "logging_steps": 5}
    record: dict[str, Any] = {}
    instruct = {**common, "train_file": data["conversations"], "output_dir": out / mapper / "instruct",
                "max_steps": args.instruct_steps, "warmup_steps": max(1, args.instruct_steps // 10)}
    if args.mapper_lr is not None:
        instruct["mapper_lr"] = args.mapper_lr
    elif args.pretrain_steps == 0:
        instruct["mapper_lr"] = _config_value("pretrain", "mapper_lr")
    if args.pretrain_steps > 0:
        start = time.perf_counter()
        run_stage_recipe("pretrain", {
            **model, **common, "train_file": data["captions"], "output_dir": out / mapper / "pretrain",
            "max_steps": args.pretrain_steps, "warmup_steps": max(1, args.pretrain_steps // 10)})
        record["pretrain_s"] = time.perf_counter() - start
        instruct["init_from"] = out / mapper / "pretrain" / "final"
    else:
        # No stage 1: stage 2 assembles the model itself, with the stage-1 config's model settings.
        instruct.update(init_from=None, model=_config_value("pretrain", "model"), **model)
    start = time.perf_counter()
    result = run_stage_recipe("instruct", instruct)
    record["instruct_s"] = time.perf_counter() - start
    history = result.history
    tail = history[-max(1, len(history) // 5):]
    record["final_train_loss"] = sum(r["loss"] for r in tail) / len(tail)  # mean of the last 20% of steps
    record["final_dir"] = str(result.final_dir)
    return record


def _feature_layer(args: argparse.Namespace) -> int:
    return _config_value("pretrain", "model.vision.feature_layer") if args.feature_layer is None else args.feature_layer


def _model_overrides(args: argparse.Namespace, mapper: str, tower: str) -> dict[str, Any]:
    """The model keys this benchmark sets on top of the stage-1 recipe's ``model:`` section."""
    return {"model.vision.name_or_path": str(tower), "model.lm.name_or_path": args.lm or _config_value("pretrain", "model.lm.name_or_path"),
            "model.mapper.kind": mapper, "model.mapper.pool": 1, "model.mapper.num_queries": args.num_queries,
            "model.vision.feature_layer": _feature_layer(args), "model.lm.max_length": args.max_length}


def fresh_model(args: argparse.Namespace, mapper: str, tower: str):
    """An untrained VLM with the settings ``train_mapper`` trains (stage 1's model keys), on the CPU."""
    from vlm_chat import VLMChat
    from vlm_chat.training.quickstart import CONFIG_DIR
    from vlm_chat.training.stages import load_stage_config

    config = load_stage_config("pretrain", CONFIG_DIR / "pretrain.yaml", _model_overrides(args, mapper, tower)).model
    chat = VLMChat.from_config(config, device="cpu", seed=args.seed)
    chat.model.configure_trainable(mapper=True, lora=True)
    return chat


def score(chat, args: argparse.Namespace) -> dict[str, Any]:
    """easy-VQA accuracy on the first ``vqa_questions`` of the fixed quick-eval subset of the TEST split."""
    from vlm_chat import eval as evaluation
    from vlm_chat.datasets import easyvqa

    samples = easyvqa.quick_eval_subset(args.vqa_questions)
    r = evaluation.evaluate_vqa(chat, samples, vocabulary=easyvqa.answer_vocabulary(), progress=False)
    return {"vqa_accuracy": r["accuracy"], "vqa_n": r["n"], "vqa_by_type": r.get("by_type")}


def timing_batches(chat, conversations: Path, images: Path, batch: int) -> dict[str, dict]:
    """The same rows as collated batches for one model: ``packed`` (``TIMING_TURNS`` QA per image) and ``single``.

    The rows are ``batch`` evenly spaced training conversations (shapes world and easy-VQA in the file's proportion)
    cut to their first QA turns, so that no sequence reaches ``max_length`` (a cut sequence would hide the visual
    tokens' cost) and every mapper sees the same text.
    """
    from vlm_chat.training.stages import Collator, DataArgs, FeatureCache, load_rows

    rows = load_rows("instruct", DataArgs(train_file=str(conversations), image_folder=str(images)), False)
    rows = [rows[i * len(rows) // batch] for i in range(batch)]
    collate = Collator(chat, "instruct", FeatureCache(chat, enabled=True))  # cached tower features, as in training
    return {shape: collate([{**r, "messages": r["messages"][: 2 * turns]} for r in rows])
            for shape, turns in (("packed", TIMING_TURNS), ("single", 1))}


def measure_steps(chats: dict[str, Any], data: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per optimizer step per mapper, alternating mappers each round, on identical rows."""
    import torch

    from bench import run as bench
    out: dict[str, Any] = {}
    batches = {m: timing_batches(c, data["conversations"], data["images"], args.batch) for m, c in chats.items()}
    optimizers = {m: bench.make_optimizer(c) for m, c in chats.items()}
    for shape in ("packed", "single"):
        fns = {}
        for m, chat in chats.items():
            chat.model.train()
            params = bench.trainable(chat.model)
            b = batches[m][shape]
            fns[m] = lambda chat=chat, b=b, opt=optimizers[m], ps=params: bench.train_step(chat.model, b, opt, ps)
        times = bench.paired(fns, args.timing_rounds, torch.device("cpu"), label=f"step ({shape})")
        base = min(times[MAPPERS[0]]) if MAPPERS[0] in times else None
        for m, ts in times.items():
            b = batches[m][shape]
            out.setdefault(m, {})[shape] = {
                "step_s": min(ts), "step_s_rounds": ts,
                "tokens": int(b["attention_mask"].sum()), "padded_tokens": int(b["input_ids"].numel()),
                "visual_tokens": chats[m].config.num_image_tokens * int(b["input_ids"].shape[0]),
                "speedup_vs_mlp": base / min(ts) if base else None,
            }
    return out


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    """Markdown: per mapper, visual tokens, step time and speed-up (packed / single QA), accuracy, training time.

    Columns of what was not measured (``--no_timing``, ``--timing_only``) are left out."""
    timed = all("timing" in r for r in rows.values())
    scored = all("vqa_accuracy" in r for r in rows.values())
    head = ["mapper", "visual tokens", "mapper params"]
    if timed:
        head += [f"tokens/step packed ({TIMING_TURNS} QA)", "s/step packed", "speed-up vs mlp packed",
                 "tokens/step 1 QA", "s/step 1 QA", "speed-up vs mlp 1 QA"]
    if scored:
        head += [f"easy-VQA acc (n={rows[next(iter(rows))]['vqa_n']})", "final train loss", "stage-2 wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sp(x: float | None) -> str:
        return f"{x:.2f}x" if x else "-"

    for m, r in rows.items():
        cells = [m, str(r["visual_tokens"]), f"{r['mapper_params']:,}"]
        if timed:
            p, s = r["timing"]["packed"], r["timing"]["single"]
            cells += [str(p["tokens"]), f"{p['step_s']:.2f}", sp(p["speedup_vs_mlp"]), str(s["tokens"]),
                      f"{s['step_s']:.2f}", sp(s["speedup_vs_mlp"])]
        if scored:
            cells += [f"{r['vqa_accuracy']:.3f}", f"{r['final_train_loss']:.3f}", f"{r['instruct_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from bench import run as bench_run
    from vlm_chat import VLMChat

    threads, why = (args.threads, "--threads") if args.threads else bench_run.auto_threads()
    torch.set_num_threads(threads)
    logger.info("torch threads: %d (%s)", threads, why)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    data = prepare(args, out)
    tower = ensure_tower(args, out, data["captions"], data["images"])
    rows: dict[str, dict] = {}
    chats = {}
    device = None if args.no_timing else "cpu"  # the timing is a CPU measurement; scoring alone may use a GPU
    for mapper in args.mappers if args.timing_only else []:
        chats[mapper] = fresh_model(args, mapper, tower)
        rows[mapper] = {"mapper": mapper, "vision": tower, "visual_tokens": chats[mapper].config.num_image_tokens,
                        "mapper_params": sum(p.numel() for p in chats[mapper].model.mapper.parameters())}
    for mapper in [] if args.timing_only else args.mappers:
        saved = out / mapper / "result.json"
        record = json.loads(saved.read_text()) if saved.is_file() and not args.force else None
        wanted = {"instruct_steps": args.instruct_steps, "pretrain_steps": args.pretrain_steps, "batch": args.batch,
                  "max_length": args.max_length, "vqa_questions": args.vqa_questions, "seed": args.seed,
                  "vision": tower, "feature_layer": _feature_layer(args)}
        if record is None or any(record.get(k) != v for k, v in wanted.items()):
            logger.info("%s: training (stage 1: %d steps, stage 2: %d steps)", mapper, args.pretrain_steps,
                        args.instruct_steps)
            record = {"mapper": mapper, **wanted, **train_mapper(args, mapper, tower, data, out)}
            chat = VLMChat.from_pretrained(record["final_dir"], device=device, is_trainable=True)
            start = time.perf_counter()
            record.update(score(chat, args))
            record["eval_s"] = time.perf_counter() - start
            record["visual_tokens"] = chat.config.num_image_tokens
            record["mapper_params"] = sum(p.numel() for p in chat.model.mapper.parameters())
            saved.write_text(json.dumps(record, indent=2) + "\n")
            logger.info("%s: easy-VQA accuracy %.3f on %d questions", mapper, record["vqa_accuracy"], record["vqa_n"])
        else:
            logger.info("%s: reusing %s (pass --force to retrain)", mapper, saved)
            chat = VLMChat.from_pretrained(record["final_dir"], device=device, is_trainable=True)
        rows[mapper], chats[mapper] = record, chat
    # Timing last and on the trained models, after scoring: its optimizer steps change the weights.
    timing = {} if args.no_timing else measure_steps(chats, data, args)
    for mapper, t in timing.items():
        rows[mapper]["timing"] = t
    summary = {
        "claim": "a few summary tokens train ~4x faster than all patch tokens, on par in accuracy (arXiv:2403.13499)",
        "command": "python -m bench.reproduce_summary_tokens " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("force",)},
        "vision": tower,
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - t0,
        "mappers": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = table(rows, args)
    (out / "results.md").write_text(md + "\n")
    print(md)  # the one thing this script exists to show
    return summary


if __name__ == "__main__":
    main()
