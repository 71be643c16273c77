"""The ``vlm-chat`` command line: ask about an image, caption it, serve the web UI.

Examples::

    vlm-chat chat --image cat.png "What is on the table?" --stream
    vlm-chat caption cat.png --detailed
    vlm-chat serve --model runs/instruct/final --port 7860
    vlm-chat eval vqa --model runs/instruct/final --output results/vqa.json
    vlm-chat eval shapes --model runs/instruct/final --split val
    vlm-chat chat --image - "What color is the shape?" < cat.png     # ``-``: the image's bytes from stdin
    echo "What color is the shape?" | vlm-chat chat --image cat.png -  # or the question

Every subcommand takes ``--model DIR`` (default: the shipped demo model, ``vlm_chat.DEMO_MODEL``). Errors are one
line on stderr (exit 2: the input or the flags; 1: anything else), with the traceback only under ``--debug``; when
stderr is not a terminal, libraries' warnings and progress bars stay off it (``vlm_chat.console``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import vlm_chat
from vlm_chat.console import setup_logging
from vlm_chat.serving import (
    DEFAULT_HOST,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PORT,
    DEFAULT_TOP_P,
    UsageError,
    generation_kwargs,
    load_model,
    resolve_model_dir,
)

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the whole usage block before it)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def _model_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="checkpoint directory (written by save_pretrained or training); default: the shipped demo model",
    )
    parent.add_argument("-v", "--verbose", action="store_true", help="log progress (model loading, requests)")
    parent.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    return parent


def _generation_parent(max_new_tokens: int | None) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("generation")
    group.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=max_new_tokens,
        help="most tokens to generate" + (f" (default {max_new_tokens})" if max_new_tokens else ""),
    )
    group.add_argument(
        "--temperature", type=_non_negative_float, default=0.0, help="0 = greedy, deterministic (default 0)"
    )
    group.add_argument(
        "--top-p",
        type=_probability,
        default=DEFAULT_TOP_P,
        help=f"nucleus sampling mass when temperature > 0 (default {DEFAULT_TOP_P})",
    )
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``vlm-chat`` argument parser (subcommands: chat, caption, serve, eval)."""
    parser = _Parser(prog="vlm-chat", description="Chat with a small vision-language model about an image.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {vlm_chat.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = _model_parent()

    chat = sub.add_parser(
        "chat",
        parents=[model, _generation_parent(DEFAULT_MAX_NEW_TOKENS)],
        help="answer a question about an image",
        description="Answer a question about an image and print the answer.",
    )
    chat.add_argument(
        "--image", metavar="PATH", default=None, help="image file, - for its bytes on stdin (omit: text only)"
    )
    chat.add_argument("question", nargs="+", help="the question (words are joined with spaces); - reads it from stdin")
    chat.add_argument("--stream", action="store_true", help="print the answer token by token as it is generated")

    caption = sub.add_parser(
        "caption",
        parents=[model, _generation_parent(None)],
        help="caption an image",
        description="Print a caption of an image.",
    )
    caption.add_argument("image", metavar="PATH", help="image file, or - for its bytes on stdin")
    caption.add_argument("--detailed", action="store_true", help="a longer, detailed caption")

    serve = sub.add_parser(
        "serve",
        parents=[model, _generation_parent(DEFAULT_MAX_NEW_TOKENS)],
        help="open the web UI (same as `python app.py`)",
        description="Serve the Gradio web UI. Generation flags set the UI's initial settings and the API defaults.",
    )
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    serve.add_argument(
        "--max-file-size",
        default=DEFAULT_MAX_FILE_SIZE,
        help=f"largest accepted upload, e.g. 5mb (default {DEFAULT_MAX_FILE_SIZE})",
    )
    serve.add_argument(
        "--max-pixels", type=_positive_int, default=None, help="largest accepted image in pixels (default: library cap)"
    )
    serve.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        help="generations run at once; others wait in the queue (default 1, right for a CPU)",
    )
    api = sub.add_parser(
        "api",
        parents=[model],
        help="serve an OpenAI-compatible API (/v1/chat/completions)",
        description="Serve GET /v1/models and POST /v1/chat/completions; generation settings come with each request.",
    )
    api.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    api.add_argument("--max-batch-size", type=_positive_int, default=8, help="most requests per batch (default 8)")
    ev = sub.add_parser(
        "eval",
        parents=[model],
        help="score the model: VQA accuracy, shapes-world accuracy per question type, POPE, caption BLEU/CIDEr",
        description="Evaluate a model (see docs/evaluation.md). Prints the metrics as JSON; --output also keeps "
        "every prediction. Without --data: vqa uses easy-VQA's fixed 1,000-question test subset; shapes, pope and "
        "captions use unseen shapes-world scenes (test seed 1234; --split val: the validation seed 2).",
    )
    ev.add_argument(
        "task",
        choices=("vqa", "shapes", "pope", "captions", "encoder"),
        help="what to evaluate; shapes: accuracy per question type and the objects detailed captions name; "
        "encoder: a stage-0 CLIP/SigLIP (zero-shot on easy-VQA's 24 classes, retrieval)",
    )
    which = ev.add_mutually_exclusive_group()
    which.add_argument(
        "--full",
        action="store_true",
        help="vqa: all questions of the split (9,673 test, 3,849 val, 34,726 train), not a 1,000-question subset",
    )
    which.add_argument(
        "--paraphrase",
        action="store_true",
        help="vqa: 400 questions about 100 easy-VQA images of the split in phrasings easy-VQA never uses",
    )
    ev.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which default set: test (final reports), val (choosing models: easy-VQA's held-out tenth of train, "
        "shapes-world seed 2), train (vqa only: the questions the models learn from, a fit check)",
    )
    ev.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="JSONL set: vqa.jsonl {image, question, answer}, pope.jsonl {image, question, label}, "
        "captions.jsonl {image, caption} (image paths relative to the file)",
    )
    ev.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N samples")
    ev.add_argument(
        "--scenes", type=_positive_int, default=None, help="shapes-world scenes (default: shapes 150, others 100)"
    )
    ev.add_argument("--detailed", action="store_true", help="captions: ask for detailed captions")
    ev.add_argument("--no-captions", action="store_true", help="shapes: questions only, no detailed captions")
    ev.add_argument("--batch-size", type=_positive_int, default=64, help="most questions per batch (default 64)")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=None, help="default: the task's own")
    ev.add_argument("--output", metavar="FILE", default=None, help="write the full results (with predictions) as JSON")
    ex = sub.add_parser(
        "export",
        parents=[model],
        help="write a standalone copy: a transformers Llava checkpoint, or a LoRA-merged vlm-chat one",
        description="Export a model. llava: a LlavaForConditionalGeneration checkpoint that transformers loads without "
        "vlm-chat, reloaded and compared with the source on probe prompts before it is published (a difference "
        "fails the command); merged: a vlm-chat checkpoint with the LoRA merged into a full copy of the LLM.",
    )
    ex.add_argument("--format", choices=("llava", "merged"), required=True, help="what to write")
    ex.add_argument("output", metavar="OUT", help="directory to write (replaced only when complete and checked)")
    return parser


def _run_export(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    chat = load_model(args.model)
    report = chat.export(args.output, format=args.format)
    if report is None:
        print(f"wrote {args.output} (merged)")
    else:
        print(f"wrote {args.output} (llava): greedy text equal on {report['greedy_equal']}/{report['probes']} probes, "
              f"largest logit difference {report['max_logit_diff']:.3g}, {report['seconds']:.1f} s")
    return 0


def _run_eval(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    from vlm_chat.eval.command import run_eval

    return run_eval(args)


def _read_image(arg: str, flag: str):
    """The image a path or ``-`` (its encoded bytes on stdin) names, decoded and checked."""
    from vlm_chat.images import load_image

    if arg != "-":
        return load_image(arg)
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError(f"{flag} -: stdin is a terminal; pipe the image in, e.g. `< cat.png`")
    data = sys.stdin.buffer.read()
    if not data:
        raise UsageError(f"{flag} -: stdin held no data (expected the bytes of a PNG/JPEG/... file)")
    try:
        return load_image(data)
    except ValueError as e:
        raise UsageError(f"{flag} -: {e}") from e


def _run_chat(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    # Read the image before loading the model: a typo in the path should not cost a model load.
    if args.question == ["-"] and args.image == "-":
        raise UsageError("stdin can carry the image (--image -) or the question (-), not both")
    image = _read_image(args.image, "--image") if args.image is not None else None
    question = sys.stdin.read().strip() if args.question == ["-"] else " ".join(args.question)
    if not question.strip():
        raise UsageError("the question is empty")
    chat = load_model(args.model)
    if args.stream:
        for piece in chat.stream(image, question, **gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(chat.generate(image, question, **gen))
    return 0


def _run_caption(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    image = _read_image(args.image, "PATH")
    chat = load_model(args.model)
    print(chat.caption(image, detailed=args.detailed, **gen))
    return 0


def _run_serve(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    from vlm_chat.serving import launch_ui

    launch_ui(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        max_file_size=args.max_file_size,
        max_pixels=args.max_pixels,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    return 0


def _run_api(args: argparse.Namespace, gen: dict[str, Any]) -> int:
    from vlm_chat.serving import launch_api

    launch_api(args.model, host=args.host, port=args.port, max_batch_size=args.max_batch_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``vlm-chat`` command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit status: 0 on success, 2 on a usage or input error, 1 on any other error (one line on
        stderr; ``--debug`` raises instead, for the traceback), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING, verbose=args.verbose or args.debug)
    if args.verbose or args.command in ("serve", "api"):
        # Our own progress only; at INFO, httpx and friends would log every request the server makes.
        logging.getLogger("vlm_chat").setLevel(logging.INFO)
    if not args.verbose:
        # transformers draws a "Loading weights" bar per model on stderr; keep stderr for answers' errors only.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if getattr(args, "seed", None) is not None:
        import torch

        torch.manual_seed(args.seed)
    runners = {"chat": _run_chat, "caption": _run_caption, "serve": _run_serve, "api": _run_api, "eval": _run_eval,
               "export": _run_export}
    try:
        # eval decodes greedily (the evaluate_* defaults), api takes settings per request, export generates nothing.
        no_gen = args.command in ("eval", "api", "export")
        gen = {} if no_gen else generation_kwargs(args.max_new_tokens, args.temperature, args.top_p)
        resolve_model_dir(args.model)  # fail before the slow imports if there is no model to load
        return runners[args.command](args, gen)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"vlm-chat {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, FileNotFoundError, ValueError, TypeError) as e:
        # Bad paths, unreadable images and bad prompts are the user's to fix: one clear line, no traceback.
        if args.debug:
            raise
        print(f"vlm-chat {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else is still one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"vlm-chat {args.command}: error: {type(e).__name__}: {_one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
