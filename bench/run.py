"""Speed and memory of vlm-chat against the bare LLM and transformers' Llava, as ratios measured in one process.

    python -m bench.run [--quick] [--device cpu|cuda] [--steps N] [--vision DIR]

Prints markdown tables and, as its last line, ``key=value`` pairs: step_ratio_vs_llm, sample_speedup_vs_hf_llava,
decode_ratio_vs_llm, ttft_ms, peak_rss_mb_train, peak_rss_mb_infer, gflops_train, matmul_gflops. What each number
means: docs/benchmarks.md.

Absolute times on a shared machine drift and stall, so every comparison is measured in alternating rounds (A B, then
B A, ...) in the same process on the same weights, and each side is summarised by its fastest round: interference from
other processes only ever adds time, so the minimum is the least disturbed estimate (as ``timeit`` advises). The
median of the per-round ratios is kept in the JSON output for comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from bench.common import (  # noqa: F401 - re-exported: the reproductions and tests use bench.run's kit
    DEMO_TOWER,
    _status_mb,
    auto_threads,
    best,
    build_demo_tower,
    ensure_lm_converted,
    llava_step_flops,
    make_optimizer,
    matmul_fn,
    paired,
    peak_rss_mb,
    ratio,
    reset_peak_rss,
    round_ratio,
    rss_mb,
    step_batches,
    sync,
    tibest,
    to_device,
    train_step,
    trainable,
    vlm_step_flops,
    vqa_groups,
)
from bench.llava_ref import build_llava
from bench.report import (  # noqa: F401 - re-exported
    TARGETS,
    args_batch,
    cpu_model,
    fmt,
    report,
    table,
    verdict,
)
from vlm_chat import VLMChat
from vlm_chat.images import load_image
from vlm_chat.offline import SMOLLM2_ALIAS
from vlm_chat.training.stages import Collator, FeatureCache

logger = logging.getLogger("bench")

#: The keys of the last output line, in order.
KEYS = ("step_ratio_vs_llm", "sample_speedup_vs_hf_llava", "decode_ratio_vs_llm", "ttft_ms", "peak_rss_mb_train",
        "peak_rss_mb_infer", "gflops_train", "matmul_gflops")
SWEEP_BATCHES = (1, 2, 4, 8)
#: Configurations of the memory sweep -> LMConfig overrides. "lora, dropout 0" shows what PEFT's per-projection
#: dropout costs: it draws a fresh mask and keeps a dropped copy of the input for each of the 7 adapted projections.
MEMORY_KINDS = {"lora": {}, "qlora": {"load_in_4bit": True}, "lora-dropout0": {"lora_dropout": 0.0}}


# ---------------------------------------------------------------------------------------------------- plumbing
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small workloads, no sweeps (about 3 minutes on 2 CPU cores).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None,
                   help="Timed rounds of every paired measurement, after one untimed warm-up round "
                        "(default: 3 with --quick, 4 otherwise).")
    p.add_argument("--vision", default=None,
                   help="CLIP vision tower directory or hub id (default: a small random CLIP built here, see DEMO_TOWER).")
    p.add_argument("--lm", default=SMOLLM2_ALIAS, help="The LLM (default: the offline SmolLM2-135M-Instruct Q4_1).")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the cores not already busy, from the load average).")
    p.add_argument("--batch", type=int, default=2, help="Sequences per step in the step-ratio benchmark.")
    p.add_argument("--turns", type=int, default=None,
                   help="QA turns per sequence in the step-ratio benchmark (default: 3 with --quick, all of the image).")
    p.add_argument("--images", type=int, default=None,
                   help="easy-VQA train images (each with all its questions) in the samples/s benchmark "
                        "(default: 1 with --quick, 6 otherwise).")
    p.add_argument("--questions", type=int, default=None,
                   help="At most this many questions per image in the samples/s benchmark (default: all; "
                        "easy-VQA has 6-12 per image, and more questions per image favour packing).")
    p.add_argument("--ours-batch", type=int, default=2, help="Images (packed conversations) per step, our path.")
    p.add_argument("--llava-batch", type=int, default=8, help="Questions per step, HF Llava path.")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="Tokens decoded per call in the decode benchmark (default: 16 with --quick, 64 otherwise).")
    p.add_argument("--json", default=None, help="Also write every measured number to this JSON file.")
    p.add_argument("--memory-child", choices=MEMORY_KINDS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps if args.steps is not None else (3 if quick else 4)
    args.turns = args.turns if args.turns is not None else (3 if quick else None)
    args.images = args.images if args.images is not None else (1 if quick else 6)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (16 if quick else 64)
    for name in ("steps", "batch", "images", "ours_batch", "llava_batch") + (("questions",) if args.questions is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured between the first and the last token)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return args


# ---------------------------------------------------------------------------------------------------- benchmarks
def bench_decode(chat: VLMChat, groups, new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of VLMChat.generate vs the bare LLM's generate at the same context length, and TTFT.

    Each side runs with ``max_new_tokens = min_new_tokens = M`` and with 1; decode speed = (M - 1) / (t_M - t_1), so
    prompt processing (image preprocessing, tower, mapper, prefill) cancels out of it and is what TTFT measures.
    """
    chat.model.eval()
    image, prompt = load_image(groups[0][0]), groups[0][1][0]["content"].replace("<image>\n", "")
    proc, tok = chat.processor, chat.processor.tokenizer
    enc = proc.encode_prompt(prompt, None, has_image=True, reserve=new_tokens)
    filler = tok(" image", add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([[filler if t == proc.image_token_id else t for t in enc.input_ids]], device=chat.device)
    context = ids.shape[1]

    def gen_cfg(n):
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=proc.stop_token_ids,
                                pad_token_id=tok.pad_token_id, suppress_tokens=[proc.image_token_id])

    def vlm(n):
        return lambda: chat.generate(image, prompt, max_new_tokens=n, min_new_tokens=n)

    def llm(n):
        cfg = gen_cfg(n)

        def run():
            with torch.inference_mode():
                out = chat.model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            if out.shape[1] != context + n:
                raise RuntimeError(f"bare LLM generated {out.shape[1] - context} tokens, expected {n}")
        return run

    m = new_tokens
    t = paired({"vlm_M": vlm(m), "llm_M": llm(m), "vlm_1": vlm(1), "llm_1": llm(1)}, rounds, chat.device,
               label="decode")
    vlm_tps = (m - 1) / (min(t["vlm_M"]) - min(t["vlm_1"]))
    llm_tps = (m - 1) / (min(t["llm_M"]) - min(t["llm_1"]))
    per_round = [(a - b) / (c - d) for a, b, c, d in zip(t["llm_M"], t["llm_1"], t["vlm_M"], t["vlm_1"])]
    return {
        "decode_ratio_vs_llm": vlm_tps / llm_tps, "decode_ratio_vs_llm_round_median": statistics.median(per_round),
        "decode_tok_s_vlm": vlm_tps, "decode_tok_s_llm": llm_tps,
        "ttft_ms": 1000 * best(t["vlm_1"]), "ttft_ms_llm": 1000 * best(t["llm_1"]),
        "decode_context_tokens": context, "decode_new_tokens": m,
    }


def bench_step(chat: VLMChat, groups, batch: int, turns: int | None, rounds: int, optimizer,
               with_matmul: bool = True, with_hf_loss: bool = True, label: str = "step") -> dict:
    """One instruct step of the VLM vs one of the bare LLM (same LoRA, same loss code, same length and batch)."""
    chat.model.train()
    vlm_batch, llm_batch = step_batches(chat, groups, batch, turns)
    params = trainable(chat.model)
    causal_lm = chat.model.causal_lm
    fns = {
        "vlm": lambda: train_step(chat.model, vlm_batch, optimizer, params),
        # The bare LLM through the same forward (text only): isolates what vision adds.
        "llm": lambda: train_step(chat.model, llm_batch, optimizer, params),
    }
    if with_hf_loss:
        # transformers' default causal-LM loss (logits at every position), for the comparison a user would make.
        fns["llm_hf"] = lambda: train_step(causal_lm, llm_batch, optimizer, params)
        # The same VLM step with PEFT's LoRA dropout off (p=0 makes nn.Dropout return its input): what it costs.
        drops = [m for n, m in chat.model.lm.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        if drops and any(m.p > 0 for m in drops):
            fns["vlm_dropout0"] = lambda: _without_dropout(drops, lambda: train_step(chat.model, vlm_batch, optimizer,
                                                                                     params))
    if with_matmul:
        mm, mm_flops = matmul_fn(chat.device, next(causal_lm.parameters()).dtype)
        fns["matmul"] = mm
    t = paired(fns, rounds, chat.device, label=label)
    flops = vlm_step_flops(chat, vlm_batch)
    out = {
        "step_ratio_vs_llm": ratio(t["vlm"], t["llm"]), "step_ratio_vs_llm_round_median": round_ratio(t["vlm"], t["llm"]),
        "step_s_vlm": best(t["vlm"]), "step_s_llm": best(t["llm"]),
        "step_batch": batch, "step_seq_len": int(vlm_batch["input_ids"].shape[1]),
        "step_visual_tokens": chat.config.num_image_tokens,
        "step_gflop": flops / 1e9, "gflops_train": flops / 1e9 / best(t["vlm"]),
        "step_tokens_per_s_vlm": vlm_batch["input_ids"].numel() / best(t["vlm"]),
    }
    if with_hf_loss:
        out.update({"step_ratio_vs_llm_hf_loss": ratio(t["vlm"], t["llm_hf"]), "step_s_llm_hf_loss": best(t["llm_hf"])})
    if "vlm_dropout0" in t:
        out.update({"step_s_vlm_lora_dropout0": best(t["vlm_dropout0"]),
                    "lora_dropout_step_cost": ratio(t["vlm"], t["vlm_dropout0"])})
    if with_matmul:
        out["matmul_gflops"] = mm_flops / 1e9 / best(t["matmul"])
    return out


def _without_dropout(drops: list[torch.nn.Dropout], fn: Callable[[], object]) -> object:
    saved = [m.p for m in drops]
    for m in drops:
        m.p = 0.0
    try:
        return fn()
    finally:
        for m, p in zip(drops, saved):
            m.p = p


def ours_epoch_fn(chat: VLMChat, groups, images_per_batch: int, optimizer) -> tuple[Callable[[], None], float]:
    """Our train/instruct.py path over the images: QA turns packed per image, the instruct Collator, a FeatureCache
    that is cold at every call (so the tower runs once per image, as in the first epoch), loss at supervised positions.
    """
    rows = [{"image": path, "messages": msgs} for path, msgs in groups]
    params = trainable(chat.model)
    flops = 0.0
    probe = Collator(chat, "instruct", FeatureCache(chat, enabled=False))
    for i in range(0, len(rows), images_per_batch):
        flops += vlm_step_flops(chat, probe(rows[i:i + images_per_batch]))

    def run():
        collate = Collator(chat, "instruct", FeatureCache(chat, enabled=True))
        for i in range(0, len(rows), images_per_batch):
            train_step(chat.model, to_device(collate(rows[i:i + images_per_batch]), chat.device), optimizer, params)

    return run, flops


def llava_epoch_fn(llava, chat: VLMChat, groups, batch: int, optimizer) -> tuple[Callable[[], None], float]:
    """HF Llava's way: one sample per question (image + question + answer), the tower on every sample, the model's
    default loss (logits at every position). Tokens and labels come from the same template as ours."""
    proc = chat.processor
    samples = []
    for path, msgs in groups:
        for k in range(0, len(msgs), 2):
            question = msgs[k]["content"].replace("<image>\n", "")
            samples.append((path, [{"role": "user", "content": "<image>\n" + question}, msgs[k + 1]]))
    params = trainable(llava)

    def collate(chunk):
        batch = proc.pad([proc.encode_conversation(m, num_images=1) for _, m in chunk], "right")
        batch["pixel_values"] = proc.pixel_values([load_image(p) for p, _ in chunk])
        return to_device(batch, chat.device)

    flops = sum(llava_step_flops(chat, collate(samples[i:i + batch])) for i in range(0, len(samples), batch))

    def run():
        for i in range(0, len(samples), batch):
            train_step(llava, collate(samples[i:i + batch]), optimizer, params)

    return run, flops


def check_llava_matches(llava, chat: VLMChat, groups) -> float:
    """Both models on one single-question sample, dropout off: the losses must agree, else the comparison is void."""
    path, msgs = groups[0]
    proc = chat.processor
    batch = proc.pad([proc.encode_conversation(msgs[:2], num_images=1)], "right")
    batch["pixel_values"] = proc.pixel_values([load_image(path)])
    batch = to_device(batch, chat.device)
    chat.model.eval()
    llava.eval()
    with torch.no_grad():
        ours, theirs = float(chat.model(**batch).loss), float(llava(**batch).loss)
    chat.model.train()
    llava.train()
    diff = abs(ours - theirs)
    tol = 1e-3 if next(llava.parameters()).dtype == torch.float32 else 5e-2
    if diff > tol:
        raise RuntimeError(f"HF Llava is not the same model: loss {theirs:.6f} vs ours {ours:.6f} on one sample")
    logger.info("HF Llava reproduces our loss on one sample: %.6f vs %.6f", theirs, ours)
    return diff


def bench_samples(chat: VLMChat, groups, args, optimizer, rounds: int) -> dict:
    llava = build_llava(chat)
    diff = check_llava_matches(llava, chat, groups)
    llava_opt = torch.optim.AdamW([{"params": [p for n, p in llava.named_parameters() if "multi_modal_projector" in n
                                               and p.requires_grad], "lr": 1e-3},
                                   {"params": [p for n, p in llava.named_parameters() if ".lora_" in n], "lr": 2e-4}])
    n_samples = sum(len(m) // 2 for _, m in groups)
    ours, ours_flops = ours_epoch_fn(chat, groups, args.ours_batch, optimizer)
    theirs, llava_flops = llava_epoch_fn(llava, chat, groups, args.llava_batch, llava_opt)
    # Warm-up on a slice (one image, two questions) instead of a whole untimed round: Llava's first backward and
    # optimizer step pay one-time costs, and a full round of Llava is the most expensive thing in the benchmark.
    small = [(groups[0][0], groups[0][1][:4])]
    for warm in (ours_epoch_fn(chat, small, 1, optimizer)[0], llava_epoch_fn(llava, chat, small, 2, llava_opt)[0]):
        chat.model.train()
        warm()
    t = paired({"ours": ours, "llava": theirs}, rounds, chat.device, warmup=0, label="samples/s")
    del llava, llava_opt
    return {
        "sample_speedup_vs_hf_llava": ratio(t["llava"], t["ours"]),
        "sample_speedup_round_median": round_ratio(t["llava"], t["ours"]),
        "samples_per_s_ours": n_samples / best(t["ours"]), "samples_per_s_llava": n_samples / best(t["llava"]),
        "samples": n_samples, "sample_images": len(groups),
        "gflop_per_sample_ours": ours_flops / n_samples / 1e9, "gflop_per_sample_llava": llava_flops / n_samples / 1e9,
        "llava_loss_abs_diff": diff,
    }


def ours_samples_per_s(chat: VLMChat, groups, args, optimizer, rounds: int) -> float:
    run, _ = ours_epoch_fn(chat, groups, args.ours_batch, optimizer)
    chat.model.train()
    t = paired({"ours": run}, rounds, chat.device, label="samples/s ours")
    return sum(len(m) // 2 for _, m in groups) / best(t["ours"])


# ---------------------------------------------------------------------------------------------------- sweeps
def sweep_batch(chat, groups, args, optimizer) -> list[dict]:
    rows = []
    for b in SWEEP_BATCHES:
        if b > len(groups):
            break
        r = bench_step(chat, groups, b, args.turns, rounds=2, optimizer=optimizer, with_matmul=False, with_hf_loss=False,
                       label=f"batch {b}")
        rows.append({"batch": b, **r})
    return rows


def sweep_visual_tokens(chat, vision, groups, args) -> list[dict]:
    rows = []
    for kind, queries in (("mlp", None), ("perceiver", 16), ("perceiver", 64), ("qformer", 16), ("qformer", 64)):
        if kind == "mlp":
            c = chat
        else:
            c = VLMChat.from_components(vision, args.lm, kind, mapper_config={"num_queries": queries},
                                        device=args.device)
        opt = make_optimizer(c)
        r = bench_step(c, groups, args.batch, args.turns, rounds=2, optimizer=opt, with_matmul=False, with_hf_loss=False,
                       label=f"{kind} {c.config.num_image_tokens}")
        r["samples_per_s_ours"] = ours_samples_per_s(c, groups, args, opt, rounds=2)
        r["mapper_params"] = sum(p.numel() for p in c.model.mapper.parameters())
        rows.append({"mapper": kind, **r})
        if c is not chat:
            del c, opt
    return rows


def sweep_memory(vision: str, args) -> list[dict]:
    """LoRA vs QLoRA (and LoRA without dropout): each in its own process, so each peak RSS is that configuration's
    alone."""
    rows = []
    for kind in MEMORY_KINDS:
        cmd = [sys.executable, "-m", "bench.run", "--memory-child", kind, "--vision", vision,
               "--lm", args.lm, "--device", args.device, "--threads", str(args.threads), "--batch", str(args.batch),
               "--images", str(args.batch)] + (["--turns", str(args.turns)] if args.turns else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)  # same cwd and env: `bench` imports as here
        if proc.returncode != 0:
            logger.warning("%s memory run failed: %s", kind, proc.stderr.strip().splitlines()[-1:])
            rows.append({"kind": kind, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]})
            continue
        rows.append({"kind": kind, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


def memory_child(args) -> None:
    """Load one configuration, take 3 training steps, print RSS figures (and the CUDA peak) as JSON.

    The load peak (weights read in full precision, then quantized for QLoRA) is reported apart from the training peak:
    after loading, VmHWM is reset to the resident size, so the training peak is that of a process that holds the
    loaded model and trains.
    """
    base = peak_rss_mb()
    start = time.perf_counter()
    chat = VLMChat.from_components(args.vision, args.lm, "mlp", device=args.device,
                                   lm_config=MEMORY_KINDS[args.memory_child])
    load_s = time.perf_counter() - start
    with torch.no_grad():  # safetensors weights are memory-mapped: read every one so all of them are resident
        for p in chat.model.parameters():
            p.detach().sum()
    load_peak, resident = peak_rss_mb(), rss_mb()
    # Anonymous (allocated) vs file-backed (the memory-mapped checkpoint, reclaimable page cache) resident memory.
    anon, file = _status_mb("RssAnon"), _status_mb("RssFile")
    reset = reset_peak_rss()
    opt = make_optimizer(chat)
    chat.model.train()
    vlm_batch, _ = step_batches(chat, vqa_groups(args.batch), args.batch, args.turns)
    params = trainable(chat.model)
    times = [tibest(lambda: train_step(chat.model, vlm_batch, opt, params), chat.device) for _ in range(3)]
    out = {"rss_after_imports_mb": base, "peak_rss_mb_load": load_peak, "rss_mb_loaded": resident,
           "rss_anon_mb_loaded": anon, "rss_file_mb_loaded": file,
           "peak_rss_mb_train": peak_rss_mb(), "train_peak_excludes_load": reset, "load_s": load_s, "step_s": best(times[1:]), "seq_len": int(vlm_batch["input_ids"].shape[1])}
    if chat.device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    how = "given"
    if args.threads is None:
        args.threads, how = auto_threads()
    torch.set_num_threads(args.threads)  # before any parallel op: forked OpenMP pools are not reused
    if args.memory_child:
        memory_child(args)
        return {}
    wall = time.perf_counter()
    device = torch.device(args.device)
    rss_base = peak_rss_mb()
    tmp = tempfile.TemporaryDirectory(prefix="vlm-bench-")
    if args.vision:
        vision, tower_note = args.vision, f"{args.vision} (given)"
    else:
        vision = build_demo_tower(Path(tmp.name) / "tower")
        tower_note = ("random-init CLIP vision tower built by the benchmark (not the demo's; see DEMO_TOWER): "
                      + ", ".join(f"{k}={v}" for k, v in DEMO_TOWER.items()))
    ensure_lm_converted(args.lm)
    groups = vqa_groups(max(args.images, args.batch, 1 if args.quick else max(SWEEP_BATCHES)))
    sample_groups = vqa_groups(args.images, args.questions)

    chat = VLMChat.from_components(vision, args.lm, "mlp", device=device)
    results: dict = {"rss_after_imports_mb": rss_base}
    # Inference first, then training: ru_maxrss only grows, so reading it after each phase gives the inference peak
    # of a process that only loaded and generated, then the peak once it has also trained (same model object).
    results.update(bench_decode(chat, groups, args.new_tokens, args.steps))
    results["peak_rss_mb_infer"] = peak_rss_mb()
    optimizer = make_optimizer(chat)
    results.update(bench_step(chat, groups, args.batch, args.turns, args.steps, optimizer))
    results["peak_rss_mb_train"] = peak_rss_mb()
    if device.type == "cuda":
        results["cuda_peak_mb_train"] = torch.cuda.max_memory_allocated(device) / 2**20
    results.update(bench_samples(chat, sample_groups, args, optimizer, args.steps))

    sweeps: dict = {"step_batch": args.batch}
    if not args.quick:
        sweeps["batch"] = sweep_batch(chat, groups, args, optimizer)
        sweeps["visual"] = sweep_visual_tokens(chat, vision, sample_groups, args)
        sweeps["memory"] = sweep_memory(vision, args)
    env = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "device": f"{args.device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                      else f" ({cpu_model()}, {os.cpu_count()} cores)"),
        "threads": f"{args.threads} ({how})",
        "torch / transformers / peft": _versions(),
        "dtype": str(next(chat.model.causal_lm.parameters()).dtype).removeprefix("torch."),
        "llm": args.lm,
        "vision tower": tower_note,
        "steps": f"{args.steps} timed rounds per comparison after a warm-up; each side's fastest round is used",
        "wall time": f"{time.perf_counter() - wall:.0f} s",
    }
    print(report(results, env, sweeps), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results, "sweeps": sweeps}, indent=2) + "\n")
    print(" ".join(f"{k}={results[k]:.4g}" for k in KEYS), flush=True)
    tmp.cleanup()
    return results


def _versions() -> str:
    import peft
    import transformers

    return f"{torch.__version__} / {transformers.__version__} / {peft.__version__}"


if __name__ == "__main__":
    main()
