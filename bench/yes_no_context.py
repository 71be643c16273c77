"""Diagnostic: does a model answer easy-VQA's yes/no questions by looking, or from earlier answers in its context?

    python -m bench.yes_no_context --model runs/demo3/instruct/final [--n 160] [--seed 0]

Asks ``n`` yes/no questions of easy-VQA's test split (seeded sample, images whose colour and shape are known) twice:
alone, as the evaluation does, and after two earlier turns that state the image's colour and shape ("what color is the
shape?" -> "red", "what shape is this?" -> "circle"). A model trained on multi-turn conversations of all an image's
questions can learn to answer "is there a red shape?" from such turns instead of from the image; it then scores much
higher with them than alone. What was measured: docs/training.md, "Two shortcuts in easy-VQA's yes/no questions".
"""

from __future__ import annotations

import argparse
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def context_turns(color: str, shape: str) -> list[dict[str, str]]:
    """Two earlier turns that give away the image's colour and shape."""
    return [
        {"role": "user", "content": "<image>\nwhat color is the shape?"},
        {"role": "assistant", "content": color},
        {"role": "user", "content": "what shape is this?"},
        {"role": "assistant", "content": shape},
    ]


def measure(chat, n: int = 160, seed: int = 0, batch_size: int = 16) -> dict[str, float | int]:
    """Accuracy on ``n`` yes/no test questions alone and after :func:`context_turns`."""
    from vlm_chat.datasets import easyvqa
    from vlm_chat.eval import extract_answer, normalize_answer

    test = easyvqa.load_split("test")
    attributes = {i: easyvqa.image_attributes(qs) for i, qs in easyvqa.group_by_image(test).items()}
    pool = [s for s in test if s.answer_type == "yes/no" and None not in attributes[s.image_id]]
    if not 0 < n <= len(pool):
        raise ValueError(f"--n must be in 1..{len(pool)}, got {n}")
    questions = random.Random(seed).sample(pool, n)
    vocabulary = easyvqa.answer_vocabulary()
    result: dict[str, float | int] = {"n": n}
    for mode in ("alone", "with_context"):
        correct = 0
        for i in range(0, n, batch_size):
            batch = questions[i : i + batch_size]
            histories = [None if mode == "alone" else context_turns(*attributes[s.image_id]) for s in batch]
            responses = chat.generate_batch([s.image for s in batch], [s.question for s in batch], histories,
                                            max_new_tokens=4)
            correct += sum(extract_answer(r, vocabulary) == normalize_answer(s.answer) for r, s in zip(responses, batch))
        result[mode] = correct / n
    return result


def main(argv: list[str] | None = None) -> dict[str, float | int]:
    parser = argparse.ArgumentParser(prog="python -m bench.yes_no_context", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A VLMChat checkpoint directory.")
    parser.add_argument("--n", type=int, default=160, help="Yes/no questions to ask (default 160).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from vlm_chat import VLMChat

    result = {"model": args.model, **measure(VLMChat.from_pretrained(args.model), args.n, args.seed)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
