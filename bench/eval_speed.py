"""Evaluation speed: today's batched path against the shared-prefix path, same model, same questions, same answers.

    python -m bench.eval_speed [--model DIR] [--questions 300] [--rounds 3] [--batch-size 16] [--shared-batch-size 64]
                               [--json FILE]

Takes the first ``--questions`` easy-VQA test questions in the package's order (whole images, ~9.7 questions each,
as in the full split), answers them greedily with ``generate_grouped(share_prefix=False)`` (``generate_batch`` on
runs of ``--batch-size`` questions: what ``vlm-chat eval vqa`` did before) and with ``share_prefix=True`` (each
image's prompt prefix run once, see ``vlm_chat.prefix_cache``, in batches of whole images of at most
``--shared-batch-size`` questions: today's default), asserts that every answer is identical, and prints
the questions per second of both, their ratio, and the full test split's projected time at the measured speed, and
the process CPU time of both (on a machine shared with other jobs, wall time also counts waiting for a core).

The questions are split into ``--rounds`` slices of whole images; each slice runs on both paths, in alternating order
(A B, then B A, ...), so that load from other processes on a shared machine falls on both sides alike. The ratio is
total time over total time; the per-round ratios are kept in the JSON output.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import vlm_chat
from vlm_chat import VLMChat
from vlm_chat.datasets import easyvqa
from vlm_chat.eval.common import generate_grouped

logger = logging.getLogger("bench.eval_speed")

#: Questions of easy-VQA's test split (what ``vlm-chat eval vqa --full`` answers).
FULL_TEST = 9_673


def _slices(samples: list, rounds: int) -> list[list]:
    """``rounds`` consecutive slices of about equal size that never cut an image's questions apart."""
    groups = list(easyvqa.group_by_image(samples).values())
    per = max(1, round(len(groups) / rounds))
    return [[s for g in groups[i : i + per] for s in g] for i in range(0, len(groups), per)]


def run(model: str, questions: int, rounds: int, batch_size: int, shared_batch_size: int, max_new_tokens: int) -> dict:
    """Time both paths; raise if any answer differs.

    Returns:
        The measurements (see the module docstring).
    """
    chat = VLMChat.from_pretrained(model, device="cpu")
    samples = easyvqa.load_split("test")[:questions]
    times = {"batched": 0.0, "shared_prefix": 0.0}
    cpu = {"batched": 0.0, "shared_prefix": 0.0}  # process CPU seconds: less sensitive to other processes' load
    per_round = []
    mismatches = []
    for r, part in enumerate(_slices(samples, rounds)):
        images, prompts = [s.image for s in part], [s.question for s in part]
        order = ("batched", "shared_prefix") if r % 2 == 0 else ("shared_prefix", "batched")
        answers, took = {}, {}
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            shared = name == "shared_prefix"
            answers[name] = generate_grouped(chat, images, prompts, shared_batch_size if shared else batch_size, name,
                                             False, share_prefix=shared, max_new_tokens=max_new_tokens)
            took[name] = time.perf_counter() - start
            times[name] += took[name]
            cpu[name] += time.process_time() - start_cpu
        per_round.append({"questions": len(part), **{f"{k}_s": round(v, 2) for k, v in took.items()},
                          "ratio": round(took["batched"] / took["shared_prefix"], 3)})
        logger.info("round %d: %s", r, per_round[-1])
        mismatches += [(s.question, a, b) for s, a, b in zip(part, answers["batched"], answers["shared_prefix"])
                       if a != b]
    if mismatches:
        raise AssertionError(f"{len(mismatches)} answers differ, e.g. {mismatches[:3]}")
    qps = {k: len(samples) / v for k, v in times.items()}
    return {
        "model": model,
        "questions": len(samples),
        "images": len(easyvqa.group_by_image(samples)),
        "batch_size": batch_size,
        "shared_batch_size": shared_batch_size,
        "threads": torch.get_num_threads(),
        "identical_answers": True,
        "batched_qps": round(qps["batched"], 3),
        "shared_prefix_qps": round(qps["shared_prefix"], 3),
        "ratio": round(times["batched"] / times["shared_prefix"], 3),
        "median_round_ratio": statistics.median(r["ratio"] for r in per_round),
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_ratio": round(cpu["batched"] / cpu["shared_prefix"], 3),
        "wall_s": {k: round(v, 1) for k, v in times.items()},
        "projected_full_test_min": {k: round(FULL_TEST / v / 60, 1) for k, v in qps.items()},
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=vlm_chat.DEMO_MODEL, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--questions", type=int, default=300, help="first N easy-VQA test questions (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per batch, today's path (default 16)")
    parser.add_argument("--shared-batch-size", type=int, default=64,
                        help="most questions per batch, shared-prefix path (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="as evaluate_vqa (default 8)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if not 0 < args.questions <= FULL_TEST or min(args.rounds, args.batch_size, args.shared_batch_size) < 1:
        parser.error("--questions must be in 1..9673, --rounds and the batch sizes >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args.model, args.questions, args.rounds, args.batch_size, args.shared_batch_size, args.max_new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['questions']} questions ({result['images']} images), batch {result['batch_size']} / "
          f"{result['shared_batch_size']}, "
          f"{result['threads']} threads: identical answers")
    print(f"batched (generate_batch): {result['batched_qps']:.2f} q/s, full test split "
          f"{result['projected_full_test_min']['batched']} min")
    print(f"shared prefix:            {result['shared_prefix_qps']:.2f} q/s, full test split "
          f"{result['projected_full_test_min']['shared_prefix']} min")
    print(f"ratio {result['ratio']:.2f}x (median of rounds {result['median_round_ratio']:.2f}x); process CPU time "
          f"{result['cpu_s']['batched']} s vs {result['cpu_s']['shared_prefix']} s ({result['cpu_ratio']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
