"""What every front end (the Gradio app, the CLI, the API server) shares: model loading, generation settings, defaults,
and the request batcher.

The front ends import this module and never each other; ``launch_ui`` starts the web UI for the CLI's ``serve`` and
``launch_api`` the OpenAI-compatible server for ``api``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vlm_chat

if TYPE_CHECKING:
    from vlm_chat.chat import VLMChat

logger = logging.getLogger(__name__)

#: Defaults shared by the command line and the web UI.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_P = 0.9
#: Gradio refuses larger uploads before they reach the model (the server answers 413).
DEFAULT_MAX_FILE_SIZE = "20mb"


class UsageError(Exception):
    """A problem with what the user asked for (bad flag value, missing model directory); printed without a traceback."""


def generation_kwargs(
    max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None
) -> dict[str, Any]:
    """Translate the user-facing generation settings into transformers ``generate`` keywords.

    Args:
        max_new_tokens: Upper bound on generated tokens; ``None`` keeps the library default.
        temperature: ``0`` (or ``None``) means greedy decoding, which is deterministic; above 0 samples.
        top_p: Nucleus-sampling mass, used only when sampling.

    Returns:
        Keywords for ``VLMChat.generate`` / ``stream`` / ``caption``.

    Raises:
        ValueError: a setting is out of range (the message names it).
    """
    kwargs: dict[str, Any] = {}
    if max_new_tokens is not None:
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        kwargs["max_new_tokens"] = int(max_new_tokens)
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails both
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not temperature:
        # Passing temperature/top_p with do_sample=False only makes transformers warn; greedy ignores them.
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=float(temperature))
        if top_p is not None:
            kwargs["top_p"] = float(top_p)
    return kwargs


def resolve_model_dir(model: str | None) -> str:
    """Return the checkpoint directory to load, or raise a `UsageError` that tells the user what to pass.

    Args:
        model: The ``--model`` value; ``None`` means the shipped demo model.

    Returns:
        The directory path as a string.
    """
    path = Path(model) if model else Path(vlm_chat.DEMO_MODEL)
    if path.is_dir():
        return str(path)
    if model is None:
        raise UsageError(
            f"the demo model is not built yet (no directory {path}). Build it with `python train/quickstart.py`, "
            "or pass --model DIR with a checkpoint written by VLMChat.save_pretrained or a training run"
        )
    if path.exists():
        raise UsageError(f"--model {model}: not a directory; pass a checkpoint directory written by save_pretrained")
    raise UsageError(f"--model {model}: directory not found")


def load_model(model: str | None) -> VLMChat:
    """Load a checkpoint directory once (``None`` = the demo model), logging what was loaded."""
    from vlm_chat.chat import VLMChat

    path = resolve_model_dir(model)
    logger.info("loading model from %s", path)
    try:
        return VLMChat.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        # The library names the missing file or the incompatible field; say which --model it was.
        raise UsageError(f"cannot load model from {path}: {e}") from e


#: Example images (shapes-world scenes) shown by the UI.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def default_examples(n_easy_vqa: int = 2) -> list[list[str]]:
    """Example (image path, question) pairs: the shapes-world scenes shipped in ``vlm_chat/assets`` and a few
    easy-VQA test images with one of their own questions.

    Args:
        n_easy_vqa: How many easy-VQA test images to include (0 for none).

    Returns:
        A list of ``[image_path, question]`` rows for ``gr.Examples``.
    """
    examples: list[list[str]] = []
    index = ASSETS_DIR / "examples.json"
    if index.is_file():
        for row in json.loads(index.read_text()):
            path = ASSETS_DIR / row["image"]
            if path.is_file():
                examples.append([str(path), row["question"]])
    if n_easy_vqa > 0:
        try:
            import easy_vqa
        except ImportError:
            logger.info("easy-vqa is not installed; its example images are left out")
            return examples
        texts, _, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
        seen: set[int] = set()
        # The first "what ..." question of each image reads better as a demo than a yes/no one.
        for text, image_id in zip(texts, image_ids):
            if image_id not in seen and text.startswith("what") and image_id in paths:
                seen.add(image_id)
                examples.append([paths[image_id], text[:1].upper() + text[1:]])
                if len(seen) == n_easy_vqa:
                    break
    return examples

def launch_ui(model: str | None, **kwargs: Any) -> None:
    """Start the Gradio chat UI on ``model`` (``None`` = the demo model); keywords as :func:`vlm_chat.app.serve`."""
    from vlm_chat.app import serve

    serve(model, **kwargs)


def launch_api(model: str | None, **kwargs: Any) -> None:
    """Start the OpenAI-compatible API server on ``model``; keywords as :func:`vlm_chat.api.serve`."""
    from vlm_chat.api import serve

    serve(model, **kwargs)


# ------------------------------------------------------------------------------------------------ request batching
@dataclass
class Completion:
    """One finished answer: its text, token counts and why it ended (``stop``, ``length`` or ``cancelled``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class GenerationRequest:
    """One prompt for the `Batcher`.

    Args:
        image: RGB image (already decoded and size-checked) or ``None`` for text only.
        prompt: The new user turn (may hold one image marker where the image goes).
        history: Earlier turns, as ``VLMChat.generate`` takes them.
        max_new_tokens: This request's own token budget.
        sampling: ``do_sample`` / ``temperature`` / ``top_p`` keywords (`generation_kwargs` without the length).
        seed: Sampling seed; a seeded sampled request runs alone, so its answer does not depend on its neighbours.
        stop: Strings that end the answer (not included in it).
        on_text: Called from the generation thread with each new piece of text (streaming); must return quickly.
        encoded: The prompt already encoded by ``processor.encode_prompt`` with ``reserve=max_new_tokens`` (the API
            encodes it to refuse a bad prompt before answering); ``None``: the batcher encodes it.
    """

    image: Any
    prompt: str
    history: list | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: dict[str, Any] = field(default_factory=lambda: {"do_sample": False})
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    encoded: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)

    def group_key(self) -> tuple:
        """Requests with equal keys can share one generation call."""
        sampled = bool(self.sampling.get("do_sample"))
        alone = id(self) if sampled and self.seed is not None else None
        return self.image is None, tuple(sorted(self.sampling.items())), alone


class _Row:
    """Per-request decoding state inside one batched generation."""

    def __init__(self, request: GenerationRequest, prompt_tokens: int):
        self.request, self.prompt_tokens = request, prompt_tokens
        self.ids: list[int] = []
        self.generated = 0
        self.text = ""  # the answer so far, cut at a stop string
        self.sent = 0  # characters of `text` already handed to on_text
        self.finish: str | None = None


class _RowStops:
    """Follows every row of a batched generation, token by token: stop tokens, stop strings, each row's own
    ``max_new_tokens``, cancellation (a client gone), and streaming text out. Returns a per-row ``[B]`` "done" mask,
    which transformers turns into padding for that row, so the batch ends when its last live row does.

    transformers' ``StopStringCriteria`` takes one stop list for the whole batch; these are per request. A
    ``StoppingCriteria`` by protocol (a callable): subclassing would import transformers with this module, which the
    CLI imports even for ``--help``.
    """

    def __init__(self, rows: list[_Row], tokenizer, stop_ids: list[int]):
        self.rows, self.tokenizer, self.stop_ids = rows, tokenizer, set(stop_ids)

    def __call__(self, input_ids, scores: Any, **kwargs: Any):
        import torch

        last = input_ids[:, -1].tolist()  # input_ids: [B, T_new], the generated tokens (prompts went in as embeds)
        for row, tok in zip(self.rows, last):
            if row.finish is None:
                self._step(row, tok)
        return torch.tensor([r.finish is not None for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def _step(self, row: _Row, tok: int) -> None:
        req = row.request
        row.generated += 1
        if tok in self.stop_ids:
            row.finish = "stop"
        else:
            row.ids.append(tok)
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True).lstrip()
            hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if hits:
                text, row.finish = text[: min(hits)], "stop"
            row.text = text
            if row.finish is None and row.generated >= req.max_new_tokens:
                row.finish = "length"
        if row.finish is None and req.cancelled.is_set():
            row.finish = "cancelled"
        self.emit(row)

    def emit(self, row: _Row) -> None:
        """Hand new text to the request's ``on_text``: all of it once the row is done, else only what is settled."""
        if row.request.on_text is None:
            return
        if row.finish is not None:
            end = len(row.text.rstrip())
        else:
            # Hold back trailing whitespace (the final answer is stripped), an incomplete UTF-8 character, and any
            # tail that could still grow into a stop string.
            text = row.text.rstrip().rstrip("\ufffd")
            end = len(text)
            for s in row.request.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
            end = len(text[:end].rstrip())  # the space before a held-back tail may end the answer too
        if end > row.sent:
            piece, row.sent = row.text[row.sent:end], end
            try:
                row.request.on_text(piece)
            except Exception:  # a consumer that broke (e.g. its event loop closed) loses its row, not the batch
                logger.exception("streaming a piece failed; cancelling that request")
                row.request.cancelled.set()


class Batcher:
    """Runs `GenerationRequest` s on one model, batching those that wait: while a generation runs, new requests queue,
    and the next generation takes all compatible queued ones (up to ``max_batch_size``) in one left-padded batch.

    Greedy answers are the same as one at a time (`VLMChat.generate_batch`'s guarantee); each row stops on its own
    stop token, stop string, budget or cancellation, and the batch ends with its last live row.

    Clients that loop (answer, next question) come back just after their batch ends, one by one; taking only the
    first of them would split them into a batch of one and a batch of the rest, again and again. So while fewer
    requests wait than the last batch had, the batcher waits for the others, up to a quarter of the last batch's
    duration and at most ``gather_s`` (a small share of the work on any device). A lone client never waits (its last
    batch had one row).

    Args:
        chat: The model.
        max_batch_size: Largest batch.
        gather_s: Longest wait for the rest of the last batch's clients to come back.
    """

    def __init__(self, chat: VLMChat, max_batch_size: int = 8, gather_s: float = 0.2):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.chat, self.max_batch_size, self.gather_s = chat, max_batch_size, gather_s
        self._last_rows, self._last_s = 0, 0.0
        self._pending: deque[GenerationRequest] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # size of every generation run, for benchmarks and tests
        self._thread = threading.Thread(target=self._loop, name="vlm-chat-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue a request; its ``future`` resolves to a `Completion` (or the error that refused it)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(request)
            self._cv.notify()
        return request.future

    def pending(self) -> int:
        """How many requests wait for the model (the running batch not included)."""
        with self._cv:
            return len(self._pending)

    def close(self) -> None:
        """Stop after the running generation; queued requests fail with RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        while self._pending:
            self._pending.popleft().future.set_exception(RuntimeError("the server is shutting down"))

    def _next_group(self) -> list[GenerationRequest] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            key = self._pending[0].group_key() if self._pending else None
            want = min(self.max_batch_size, self._last_rows)
            deadline = time.monotonic() + min(self.gather_s, 0.25 * self._last_s)
            while not self._closed and sum(r.group_key() == key for r in self._pending) < want:
                if (left := deadline - time.monotonic()) <= 0:
                    break
                self._cv.wait(left)
            if self._closed:
                return None
            group = [r for r in self._pending if r.group_key() == key][: self.max_batch_size]
            for r in group:
                self._pending.remove(r)
            self._last_rows = len(group)
            return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            start = time.monotonic()
            try:
                self._run(group)
            except BaseException as e:  # never let the worker die: fail this batch, serve the next
                logger.exception("batched generation failed")
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)
            self._last_s = time.monotonic() - start

    def _run(self, group: list[GenerationRequest]) -> None:
        from vlm_chat.images import load_image

        processor = self.chat.processor
        rows, encoded = [], []
        for r in group:
            if r.cancelled.is_set():
                r.future.set_result(Completion("", 0, 0, "cancelled"))
                continue
            try:  # each row with its own budget reserved, as it would be alone
                enc = r.encoded if r.encoded is not None else processor.encode_prompt(
                    r.prompt, r.history, has_image=r.image is not None, reserve=r.max_new_tokens)
            except (ValueError, TypeError) as e:
                r.future.set_exception(e)
                continue
            rows.append(_Row(r, len(enc.input_ids)))
            encoded.append(enc)
        if not rows:
            return
        batch = processor.pad(encoded, padding_side="left")  # input_ids / attention_mask: [B, T]
        if rows[0].request.image is not None:
            batch["pixel_values"] = processor.pixel_values([load_image(r.request.image) for r in rows])
        self.batch_sizes.append(len(rows))
        first = rows[0].request
        tracker = _RowStops(rows, processor.tokenizer, processor.stop_token_ids)
        self.chat.generate_tokens(batch, stopping_criteria=[tracker], seed=first.seed,
                                  max_new_tokens=max(r.request.max_new_tokens for r in rows), **first.sampling)
        for row in rows:
            if row.finish is None:  # the model's own limits ended it (e.g. the context): count it as length
                row.finish = "length"
                tracker.emit(row)
            row.request.future.set_result(
                Completion(row.text.strip(), row.prompt_tokens, row.generated, row.finish)
            )
