"""The measuring kit of ``bench.run`` and the reproductions: process memory, paired timing rounds, and the
workloads (the benchmark's tower, easy-VQA question groups, one training step, FLOP counts)."""

from __future__ import annotations

import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.flops import LMShape, lm_train_flops, mapper_train_flops, vit_forward_flops
from vlm_chat import VLMChat
from vlm_chat.datasets import easyvqa
from vlm_chat.offline import SMOLLM2_ALIAS, cache_dir
from vlm_chat.prompting import IGNORE_INDEX
from vlm_chat.training.stages import Collator, FeatureCache

logger = logging.getLogger("bench")

#: The tower the benchmark builds unless given --vision: a random-init CLIP vision encoder for easy-VQA's 64-pixel
#: images (8-pixel patches -> 64 patch tokens + CLS), twice as wide as the shipped demo's (hidden 128). Speed does not
#: depend on its weights; keeping it fixed keeps runs comparable with the measured ones in docs/benchmarks.md.
DEMO_TOWER = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "image_size": 64, "patch_size": 8}


def auto_threads() -> tuple[int, str]:
    """Threads for the cores that other processes leave free (at least one).

    On an oversubscribed machine every OpenMP parallel region waits at its barrier for a descheduled thread: measured
    here with four other agents busy, a SmolLM2 forward took 2-6x longer with 2 threads than with 1.
    """
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    n = max(1, min(cores, int(cores - load + 0.5)))
    return n, f"auto: {cores} cores, 1-min load average {load:.1f} before start"


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: ``VmHWM``.

    Not ``ru_maxrss``: Linux carries that over ``fork`` + ``exec``, so a child started from a big parent would report
    the parent's size as its own floor.
    """
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    """Resident set size now (``VmRSS``)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tibest(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 1,
           label: str = "") -> dict[str, list[float]]:
    """Run every function once per round, alternating the order (A B C, C B A, ...) so slow drift of the machine
    hits all of them alike. The first ``warmup`` rounds are not recorded."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            dt = tibest(fns[n], device)
            if r >= warmup:
                times[n].append(dt)
        logger.info("%s round %d/%d%s: %s (load average %.1f)", label, r + 1, warmup + rounds,
                    " (warm-up)" if r < warmup else "",
                    ", ".join(f"{n}={times[n][-1]:.2f}s" for n in names if times[n]) or "-", os.getloadavg()[0])
    return times


def ratio(num: list[float], den: list[float]) -> float:
    """Fastest ``num`` over fastest ``den`` (see the module docstring for why the minimum)."""
    return min(num) / min(den)


def round_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios, for comparison with :func:`ratio`."""
    return statistics.median(a / b for a, b in zip(num, den))


def best(xs: list[float]) -> float:
    return min(xs)


# ---------------------------------------------------------------------------------------------------- workloads
def build_demo_tower(directory: Path) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**DEMO_TOWER)).save_pretrained(directory)
    size = DEMO_TOWER["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(directory)
    return str(directory)


def ensure_lm_converted(lm: str) -> None:
    """Convert the offline GGUF in a child process, so its one-time ~1 GB conversion never counts in our peak RSS."""
    if Path(lm).is_dir() or (cache_dir() / SMOLLM2_ALIAS / "model.safetensors").is_file():
        return
    logger.info("converting %s once, in a separate process", lm)
    subprocess.run([sys.executable, "-c", "import sys; from vlm_chat.offline import resolve_lm; resolve_lm(sys.argv[1])",
                    lm], check=True)


def vqa_groups(num_images: int, questions: int | None = None) -> list[tuple[str, list[dict]]]:
    """The first ``num_images`` easy-VQA train images, each with (the first ``questions`` of) its questions as one
    conversation."""
    samples = easyvqa.load_split("train")
    groups = easyvqa.group_by_image(samples)
    ids = list(groups)[:num_images]
    picked = [s for i in ids for s in groups[i]]
    convs = easyvqa.conversations(picked)
    return [(groups[i][0].image, convs[i][0][: 2 * questions] if questions else convs[i][0]) for i in ids]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def step_batches(chat: VLMChat, groups, batch: int, turns: int | None) -> tuple[dict, dict]:
    """A VLM batch from the instruct collator (pixels in: the tower runs inside the step) and the same batch for the
    bare LLM: image positions hold a text token instead, so length, padding and supervised positions are identical."""
    rows = [{"image": path, "messages": msgs[: 2 * turns] if turns else msgs} for path, msgs in groups[:batch]]
    if len(rows) < batch:
        raise ValueError(f"--batch {batch} needs {batch} images; the benchmark loaded {len(rows)} (raise --images)")
    vlm = Collator(chat, "instruct", FeatureCache(chat, enabled=False))(rows)
    filler = chat.processor.tokenizer(" image", add_special_tokens=False)["input_ids"][0]
    ids = vlm["input_ids"].clone()
    ids[ids == chat.processor.image_token_id] = filler
    llm = {"input_ids": ids, "attention_mask": vlm["attention_mask"], "labels": vlm["labels"]}
    return to_device(vlm, chat.device), to_device(llm, chat.device)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(chat: VLMChat) -> torch.optim.Optimizer:
    """The instruct stage's groups: mapper lr 1e-3, LoRA lr 2e-4."""
    chat.model.configure_trainable(mapper=True, lora=True)
    lora = [p for n, p in chat.model.lm.named_parameters() if "lora_" in n]
    return torch.optim.AdamW([{"params": list(chat.model.mapper.parameters()), "lr": 1e-3},
                              {"params": lora, "lr": 2e-4}])


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, params) -> float:
    """One optimizer step as the engine takes it: forward (loss), backward, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(loss)


def vlm_step_flops(chat: VLMChat, batch: dict) -> float:
    """Analytic FLOPs of one VLM training step on ``batch`` (see bench/flops.py for the rules)."""
    b, t = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    vision = chat.model.vision
    n_img = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else int(batch["image_features"].shape[0])
    mapper_params = sum(p.numel() for p in chat.model.mapper.parameters())
    lm = lm_train_flops(LMShape.from_config(chat.model.causal_lm.config), b, t, supervised, chat.config.lm.lora_r)
    return lm + vit_forward_flops(vision.model.config, n_img) + mapper_train_flops(mapper_params, n_img, vision.grid**2)


def llava_step_flops(chat: VLMChat, batch: dict) -> float:
    """Analytic FLOPs of one HF Llava step: LM head at every position, tower once per sample."""
    b, t = batch["input_ids"].shape
    vision = chat.model.vision
    mapper_params = sum(p.numel() for p in chat.model.mapper.parameters())
    lm = lm_train_flops(LMShape.from_config(chat.model.causal_lm.config), b, t, b * t, chat.config.lm.lora_r)
    return lm + vit_forward_flops(vision.model.config, b) + mapper_train_flops(mapper_params, b, vision.grid**2)


def matmul_fn(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A plain square matmul in the training dtype and its FLOPs (repeated on a GPU, where one is microseconds)."""
    n, reps = (4096, 20) if device.type == "cuda" else (2048, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run():
        for _ in range(reps):
            torch.mm(a, b)

    return run, 2.0 * n**3 * reps
