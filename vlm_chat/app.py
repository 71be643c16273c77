"""The Gradio web UI: chat about an image (streamed, multi-turn), caption it, and two API endpoints for scripts.

Start it with ``python app.py`` or ``vlm-chat serve`` (see ``docs/app.md``). The model is loaded once and shared by
every session; all generation goes through Gradio's queue with one concurrency group, so by default a CPU runs one
generation at a time and the other requests wait their turn instead of competing for cores.

API endpoints (``gradio_client``): ``/answer`` (image, question) -> text and ``/caption`` (image) -> text. They use
the server's generation defaults; the UI's Settings panel only affects the UI.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image

from vlm_chat.images import MAX_PIXELS, load_image
from vlm_chat.serving import (
    DEFAULT_HOST,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PORT,
    DEFAULT_TOP_P,
    default_examples,
    generation_kwargs,
    load_model,
)

if TYPE_CHECKING:
    from vlm_chat.chat import VLMChat

logger = logging.getLogger(__name__)

#: Questions longer than this are refused in the UI (the model's context is small; this is far beyond useful).
MAX_QUESTION_CHARS = 2000
#: Every model call shares this Gradio concurrency group, so the limit counts generations across all buttons.
_MODEL_GROUP = "model"

Turn = dict[str, str]  # {"role": "user" | "assistant", "content": str}

_CSS = """
#vlm-header h1 { margin-bottom: 0.1em; }
#vlm-header p { margin-top: 0; opacity: 0.8; }
/* Scale small images (the 64-pixel shapes scenes) up to the panel instead of showing a thumbnail. */
#vlm-image img { width: 100%; height: 100%; object-fit: contain; }
#vlm-examples td { padding: 4px 8px; }
"""


def _theme() -> gr.themes.Base:
    return gr.themes.Soft(
        primary_hue="indigo",
        # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    )


@dataclass
class UISettings:
    """Initial values of the Settings panel, also the generation settings of the API endpoints.

    Attributes:
        max_new_tokens: Most tokens generated per answer.
        temperature: 0 = greedy (deterministic); above 0 samples.
        top_p: Nucleus-sampling mass when sampling.
        max_pixels: Images with more pixels are refused before decoding.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = DEFAULT_TOP_P
    max_pixels: int = MAX_PIXELS


def _user_error(message: str, title: str = "Error") -> gr.Error:
    # The user's mistake, not a server fault: a toast in the UI, no traceback in the server log.
    return gr.Error(message, title=title, print_exception=False)


def _image_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` whose upload errors reach the user as a message instead of Gradio's internal traceback.

    Gradio opens every uploaded image with PIL before our handlers run; a file that is not an image fails there with
    a generic "could not preprocess" error. Wrapping this instance's ``preprocess`` (rather than subclassing: Gradio
    writes a ``.pyi`` stub next to the module of every Component subclass) turns that into a ``gr.Error``.
    """
    component = gr.Image(**kwargs)
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as e:  # whatever PIL raises for this file, the file is at fault, not the server
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            logger.info("refused upload %s: %s: %s", name, type(e).__name__, e)
            raise _user_error(f"Cannot use {name}: it is not a readable image file.", title="Unreadable image") from e

    component.preprocess = preprocess
    return component


def _read_image(path: str | None, max_pixels: int) -> Image.Image:
    """Open an uploaded image for the model, turning every way it can be wrong into a message for the user."""
    if path is None:
        raise _user_error("No image yet: upload one or pick an example below.", title="No image")
    try:
        return load_image(path, max_pixels=max_pixels)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        # The library names the server-side temp path; the user knows the file by its own name.
        message = str(e).replace(str(path), "the uploaded file")
        raise _user_error(f"Cannot use this image: {message}", title="Unreadable image") from e


def _clean_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise _user_error("Type a question about the image first.", title="Empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise _user_error(
            f"The question is {len(question):,} characters long; the limit is {MAX_QUESTION_CHARS:,}.",
            title="Question too long",
        )
    return question


def _settings(max_new_tokens: float, temperature: float, top_p: float) -> dict[str, Any]:
    try:
        return generation_kwargs(int(max_new_tokens), float(temperature), float(top_p))
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf) (found by tests/test_fuzz_app.py)
        raise _user_error(f"Invalid setting: {e}", title="Settings") from e


def _display(turns: list[Turn]) -> list[Turn]:
    """Chatbot messages for the stored turns (an empty answer would otherwise render as an invisible bubble)."""
    return [
        {"role": t["role"], "content": t["content"] if t["content"].strip() else "_(empty answer)_"}
        if t["role"] == "assistant"
        else dict(t)
        for t in turns
    ]


class ChatHandlers:
    """What the UI and the API endpoints do, without Gradio's wiring (so tests can call it directly).

    Every user mistake becomes a ``gr.Error`` with a message for the user; the Gradio session survives it.

    Args:
        chat: The loaded model, shared by every session.
        settings: API generation settings and the image pixel cap.
    """

    def __init__(self, chat: VLMChat, settings: UISettings | None = None):
        self.chat = chat
        self.settings = settings or UISettings()
        self.api_kwargs = generation_kwargs(
            self.settings.max_new_tokens, self.settings.temperature, self.settings.top_p
        )

    def _stream_turn(self, image_path, question, history, max_new_tokens, temperature, top_p, tail=()) -> Iterator:
        """Stream one answer after `history`; yields (chatbot messages, turns, *tail) as the text grows."""
        image = _read_image(image_path, self.settings.max_pixels)
        gen = _settings(max_new_tokens, temperature, top_p)
        user = {"role": "user", "content": question}

        def turns(text: str) -> list[Turn]:  # a fresh list per update: Gradio may still hold the previous one
            return [*history, user, {"role": "assistant", "content": text}]

        text = ""
        # Until the first token the chat shows the question alone, with Gradio's "thinking" dots under it;
        # the state already holds the whole turn, so Retry can take it again if generation fails.
        yield _display([*history, user]), turns(text), *tail
        try:
            # Gradio closes this generator when the client leaves: closing the stream stops it at the next token.
            with contextlib.closing(self.chat.stream(image, question, history=history or None, **gen)) as pieces:
                for piece in pieces:
                    text += piece
                    yield _display(turns(text)), turns(text), *tail
        except (ValueError, TypeError) as e:
            raise _user_error(f"The model refused this request: {e}", title="Generation failed") from e
        if not text:
            yield _display(turns(text)), turns(text), *tail
        logger.info("answered %r with %d characters", question[:80], len(text))

    def respond(self, image_path, question, turns, max_new_tokens, temperature, top_p) -> Iterator[tuple]:
        """Chat tab, Send: ask `question` about the image after the earlier `turns`.

        Yields:
            ``(chatbot messages, new turns, "")``; the empty string clears the question box.
        """
        question = _clean_question(question)
        yield from self._stream_turn(image_path, question, turns, max_new_tokens, temperature, top_p, tail=("",))

    def retry(self, image_path, turns, max_new_tokens, temperature, top_p) -> Iterator[tuple]:
        """Chat tab, Retry: answer the last question again (differently only when sampling).

        Yields:
            ``(chatbot messages, new turns)``.
        """
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last_user is None:
            raise _user_error("Nothing to retry yet: ask a question first.", title="Retry")
        yield from self._stream_turn(
            image_path, turns[last_user]["content"], turns[:last_user], max_new_tokens, temperature, top_p
        )

    def caption(self, image_path, detailed, max_new_tokens, temperature, top_p) -> str:
        """Caption tab: a short or detailed caption with the UI's settings."""
        image = _read_image(image_path, self.settings.max_pixels)
        gen = _settings(max_new_tokens, temperature, top_p)
        try:
            return self.chat.caption(image, detailed=bool(detailed), **gen)
        except (ValueError, TypeError) as e:
            raise _user_error(f"The model refused this request: {e}", title="Generation failed") from e

    def answer_api(self, image_path: str | None, question: str | None) -> str:
        """Answer one question about an image (single turn, the server's generation settings)."""
        question = _clean_question(question)
        image = _read_image(image_path, self.settings.max_pixels)
        try:
            return self.chat.generate(image, question, **self.api_kwargs)
        except (ValueError, TypeError) as e:
            raise _user_error(f"The model refused this request: {e}", title="Generation failed") from e

    def caption_api(self, image_path: str | None) -> str:
        """A short caption of an image (the server's generation settings)."""
        image = _read_image(image_path, self.settings.max_pixels)
        try:
            return self.chat.caption(image, **self.api_kwargs)
        except (ValueError, TypeError) as e:
            raise _user_error(f"The model refused this request: {e}", title="Generation failed") from e

    @staticmethod
    def validate_question(image_path, question, *others) -> list[dict]:
        """Gradio validator of the Send event: marks a missing image or an empty question on the input itself,
        without running (or showing an error on) the chat. `respond` repeats the checks for any other caller."""
        return [
            gr.validate(image_path is not None, "Upload an image or pick an example first."),
            gr.validate(bool((question or "").strip()), "Type a question about the image first."),
            *(gr.validate(True, "") for _ in others),
        ]

    @staticmethod
    def validate_image(image_path, *others) -> list[dict]:
        """Gradio validator of the caption buttons: a missing image is marked on the image input."""
        return [
            gr.validate(image_path is not None, "Upload an image or pick an example first."),
            *(gr.validate(True, "") for _ in others),
        ]

    def check_upload(self, image_path) -> None:
        """Early feedback when a file is dropped, before anyone presses Send."""
        if image_path is not None:
            _read_image(image_path, self.settings.max_pixels)


def build_app(chat: VLMChat, settings: UISettings | None = None, *, model_name: str = "", concurrency: int = 1):
    """Build the Gradio Blocks app around one loaded model.

    Args:
        chat: The loaded model, shared by every session.
        settings: Initial UI settings, API generation settings and the image pixel cap.
        model_name: Shown in the header (e.g. the checkpoint directory).
        concurrency: How many generations may run at once across all sessions; the rest wait in the queue.

    Returns:
        A ``gr.Blocks`` app with its queue configured; launch it with `launch_app`.
    """
    settings = settings or UISettings()
    h = ChatHandlers(chat, settings)
    model_events = {"concurrency_limit": concurrency, "concurrency_id": _MODEL_GROUP}

    with gr.Blocks(title="vlm-chat", analytics_enabled=False) as demo:
        turns = gr.State([])
        subtitle = f"Model: `{model_name}`" if model_name else ""
        gr.Markdown("# vlm-chat\nUpload an image, then ask about it or caption it. " + subtitle, elem_id="vlm-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                image = _image_input(
                    label="Image",
                    type="filepath",
                    image_mode=None,  # keep the original file; load_image does the conversion and the checks
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="vlm-image",
                )
                examples_slot = gr.Column()  # filled below, once the question box exists
                with gr.Accordion("Settings", open=False, elem_id="vlm-settings"):
                    max_new_tokens = gr.Slider(1, 512, value=settings.max_new_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(
                        0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature", info="0 = greedy"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p", info="when sampling")
            with gr.Column(scale=3, min_width=380):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(
                        label="Conversation",
                        show_label=False,  # the floating label would cover the first message once it scrolls
                        height=380,
                        layout="bubble",
                        buttons=["copy"],
                        placeholder="Ask anything about the image. Follow-up questions continue the conversation; "
                        "a new image starts a new one.",
                        elem_id="vlm-chatbot",
                    )
                    with gr.Row(equal_height=True):
                        question = gr.Textbox(
                            label="Question",
                            show_label=False,
                            placeholder="Ask about the image and press Enter",
                            scale=5,
                            max_lines=4,
                            max_length=MAX_QUESTION_CHARS,
                            elem_id="vlm-question",
                        )
                        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="vlm-send")
                    with gr.Row():
                        retry_btn = gr.Button("Retry", size="sm", elem_id="vlm-retry")
                        clear_btn = gr.Button("Clear", size="sm", elem_id="vlm-clear")
                with gr.Tab("Caption"):
                    with gr.Row():
                        short_btn = gr.Button("Short caption", variant="primary", elem_id="vlm-caption-short")
                        detailed_btn = gr.Button("Detailed caption", elem_id="vlm-caption-detailed")
                    caption_box = gr.Textbox(
                        label="Caption", lines=5, interactive=False, buttons=["copy"], elem_id="vlm-caption"
                    )
        examples = default_examples()
        if examples:
            with examples_slot:
                gr.Examples(
                    examples,
                    inputs=[image, question],
                    label="Examples: click one to load its image and question",
                    examples_per_page=3,
                    elem_id="vlm-examples",
                )

        gen_inputs = [max_new_tokens, temperature, top_p]
        chat_outputs = [chatbot, turns]
        # UI events are "private": scripts get the two documented endpoints below, not the UI's internals.
        for trigger in (send.click, question.submit):
            trigger(
                h.respond,
                [image, question, turns, *gen_inputs],
                [*chat_outputs, question],
                api_visibility="private",
                validator=h.validate_question,
                **model_events,
            )
        retry_btn.click(h.retry, [image, turns, *gen_inputs], chat_outputs, api_visibility="private", **model_events)
        clear_btn.click(lambda: ([], [], ""), None, [*chat_outputs, question], api_visibility="private", queue=False)
        chatbot.clear(lambda: [], None, turns, api_visibility="private", queue=False)  # the chatbot's own bin icon
        # A new (or removed) image starts a new conversation; the question box is kept so examples fill it.
        image.change(lambda: ([], [], ""), None, [*chat_outputs, caption_box], api_visibility="private", queue=False)
        image.upload(h.check_upload, image, None, api_visibility="private", concurrency_limit=None)
        short_btn.click(
            lambda img, *g: h.caption(img, False, *g),
            [image, *gen_inputs],
            caption_box,
            api_visibility="private",
            validator=h.validate_image,
            **model_events,
        )
        detailed_btn.click(
            lambda img, *g: h.caption(img, True, *g),
            [image, *gen_inputs],
            caption_box,
            api_visibility="private",
            validator=h.validate_image,
            **model_events,
        )

        # The documented API: hidden triggers, fixed signatures (image, question) -> text and (image) -> text.
        api_out = gr.Textbox(visible=False)
        gr.Button(visible=False).click(h.answer_api, [image, question], api_out, api_name="answer", **model_events)
        gr.Button(visible=False).click(h.caption_api, [image], api_out, api_name="caption", **model_events)

    demo.queue(default_concurrency_limit=concurrency, max_size=256)
    return demo


def launch_app(
    demo: gr.Blocks,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    block: bool = True,
) -> str:
    """Launch a built app with the safe defaults.

    Args:
        demo: From `build_app`.
        host: Address to bind; the default 127.0.0.1 is reachable from this machine only.
        port: TCP port (``None``: Gradio picks a free one from 7860 up).
        share: Also open a public gradio.live tunnel. Off unless asked for.
        max_file_size: Largest upload Gradio accepts (e.g. ``"20mb"`` or bytes); larger ones are refused with 413.
        block: Serve until interrupted; ``False`` returns at once (tests).

    Returns:
        The local URL.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the UI is reachable from other machines on this network", host)
    if share:
        logger.warning("--share: a public gradio.live link will let anyone with the link use this model")
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,  # explicit False: Gradio would otherwise share automatically in notebooks
        max_file_size=max_file_size,
        show_error=False,  # user mistakes are gr.Error messages; other exceptions stay in the server log
        prevent_thread_lock=not block,
        ssr_mode=False,  # no Node server: one process, one port
        footer_links=["api"],
        theme=_theme(),  # Gradio 6 takes theme and css at launch, not in Blocks()
        css=_CSS,
        quiet=not block,
    )
    return url


def serve(
    model: str | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    max_pixels: int | None = None,
    concurrency: int = 1,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = DEFAULT_TOP_P,
) -> None:
    """Load a model once and serve the UI until interrupted (``python app.py`` / ``vlm-chat serve``).

    Args:
        model: Checkpoint directory; ``None`` = the shipped demo model.
        host: Address to bind.
        port: TCP port.
        share: Open a public share link too.
        max_file_size: Upload size cap.
        max_pixels: Image pixel cap (``None``: the library's `vlm_chat.images.MAX_PIXELS`).
        concurrency: Generations at once.
        max_new_tokens: Initial UI setting and API setting (``None``: the default).
        temperature: Initial UI setting and API setting (0 = greedy).
        top_p: Initial UI setting and API setting.
    """
    chat = load_model(model)
    settings = UISettings(
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=temperature,
        top_p=top_p,
        max_pixels=max_pixels or MAX_PIXELS,
    )
    name = model or "demo model"
    demo = build_app(chat, settings, model_name=name, concurrency=concurrency)
    launch_app(demo, host=host, port=port, share=share, max_file_size=max_file_size, block=True)
