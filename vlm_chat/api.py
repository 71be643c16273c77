"""An OpenAI-compatible HTTP server (``vlm-chat api``): ``GET /v1/models`` and ``POST /v1/chat/completions``.

Images come inline, as ``image_url`` parts holding ``data:`` URLs; the server fetches nothing. Every request, streamed
or not, goes through one `vlm_chat.serving.Batcher`: requests that arrive while the model is busy join the next
batched generation. A client that goes away (closes its stream, or drops a pending request) has its row stopped at
the next token. Errors are OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm_chat.images import MAX_PIXELS, load_image
from vlm_chat.serving import DEFAULT_HOST, DEFAULT_MAX_NEW_TOKENS, Batcher, GenerationRequest, generation_kwargs

logger = logging.getLogger(__name__)

DEFAULT_API_PORT = 8000
#: Largest request body (a base64 image is 4/3 of its file); larger ones get 413 before they are parsed.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Largest image file inside a data URL, after base64 decoding (the pixel cap is `vlm_chat.images.MAX_PIXELS`).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
#: Requests waiting for the model beyond this get 503 instead of an ever longer queue.
MAX_PENDING = 256
_MAX_STOP = 4  # OpenAI's own limit on stop sequences


class APIError(Exception):
    """A request the server refuses: rendered as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ request schema
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, store, ...)


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: this server returns one choice per request; send n=1 (or omit it)", "n")
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise APIError(400, f"{name} (function calling) is not supported by this model", name)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server", "logprobs")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported; leave it at 0", name)


# ------------------------------------------------------------------------------------------------ messages
def decode_data_url(url: str, param: str, max_image_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS):
    """An ``image_url`` value -> RGB ``PIL.Image``; only ``data:`` URLs (base64), within the size caps.

    Args:
        url: The URL string of an ``image_url`` part.
        param: Where it sits in the request, for the error message.
        max_image_bytes: Cap on the decoded file size.
        max_pixels: Cap on width x height.

    Raises:
        APIError: a remote or malformed URL, bad base64, an oversized or undecodable image.
    """
    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched by this server; send the image inline as a data URL "
                       "(data:image/png;base64,...)", param, "remote_url_not_supported")
    if not url.startswith("data:"):
        raise APIError(400, f"image_url must be a data: URL (data:image/png;base64,...), got {url[:40]!r}", param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, "image data URL must be base64: data:<mime>;base64,<data>", param)
    if len(payload) > (max_image_bytes + 2) // 3 * 4 + 4:  # refuse before decoding
        raise APIError(413, f"image is over the {max_image_bytes:,}-byte limit", param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image data URL is not valid base64 ({e})", param) from e
    if len(data) > max_image_bytes:
        raise APIError(413, f"image is {len(data):,} bytes, over the {max_image_bytes:,}-byte limit", param,
                       "image_too_large")
    try:
        return load_image(data, max_pixels=max_pixels)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"cannot read the image: {e}", param, "invalid_image") from e


@dataclass
class Conversation:
    """OpenAI messages mapped onto ``VLMChat.generate``'s arguments."""

    image: Any
    prompt: str
    history: list[dict[str, Any]]


def to_conversation(messages: list[ChatMessage], image_token: str, **image_caps: int) -> Conversation:
    """Map OpenAI ``messages`` to (image, prompt, history).

    System (and ``developer``) messages must come first; the last message must be the user's new turn. The model
    takes one image per conversation, so a second ``image_url`` anywhere is refused (400) rather than dropped.

    Args:
        messages: The request's messages.
        image_token: The model's image placeholder; refused in message text, where it would be taken for an image.
        **image_caps: ``max_image_bytes`` / ``max_pixels`` for `decode_data_url`.

    Raises:
        APIError: what is wrong and where (``messages[i].content[j]``).
    """
    image, image_at, turns = None, None, []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] has role {msg.role!r}; supported: system, developer, user, assistant",
                           f"messages[{i}].role")
        if role == "system" and any(t["role"] != "system" for t in turns):
            raise APIError(400, f"messages[{i}]: system messages must come before the conversation", f"messages[{i}]")
        if msg.content is None:
            raise APIError(400, f"messages[{i}] has no content (tool calls are not supported)",
                           f"messages[{i}].content")
        parts = [ContentPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        out = []
        for j, part in enumerate(parts):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if image_token in (part.text or ""):
                    raise APIError(400, f"{param}: the text holds {image_token!r}, this model's image placeholder; "
                                   "send images as image_url parts", param)
                out.append({"type": "text", "text": part.text or ""})
            elif part.type == "image_url" and role == "user":
                if image is not None:
                    raise APIError(400, f"{param}: this model takes one image per conversation and {image_at} "
                                   "already has one; start a new conversation for another image", param,
                                   "too_many_images")
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                if not url:
                    raise APIError(400, f"{param}: image_url part without a url", param)
                image, image_at = decode_data_url(url, f"{param}.image_url", **image_caps), param
                out.append({"type": "image"})
            else:
                raise APIError(400, f"{param}: unsupported part type {part.type!r} for role {role!r} "
                               "(text for every role, image_url for user messages)", param)
        if role == "system":
            out = " ".join(p["text"] for p in out)
        turns.append({"role": role, "content": out})
    last = turns.pop()
    if last["role"] != "user":
        raise APIError(400, f"the last message must be the user's (got {last['role']!r})", f"messages[{len(turns)}]")
    systems = [t["content"] for t in turns if t["role"] == "system"]
    history = [t for t in turns if t["role"] != "system"]
    if systems:  # chat templates take one system turn: several leading ones are joined
        history.insert(0, {"role": "system", "content": "\n\n".join(systems)})
    if not "".join(p.get("text", "") for p in last["content"]).strip():
        raise APIError(400, "the last user message has no text; ask a question (about the image)",
                       f"messages[{len(turns)}].content")
    # The image part becomes the image marker where it stands; content_text lays it out as "<image>\ntext".
    return Conversation(image, last["content"], history)


# ------------------------------------------------------------------------------------------------ the app
def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > _MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop takes up to {_MAX_STOP} non-empty strings", "stop")
    return stops


async def _read_json(request: Request, max_body_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"request body is {int(declared):,} bytes, over the {max_body_bytes:,}-byte limit",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"request body is over the {max_body_bytes:,}-byte limit", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from e


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(chat, *, model_id: str, max_batch_size: int = 8, max_body_bytes: int = MAX_BODY_BYTES,
               max_image_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS,
               max_pending: int = MAX_PENDING) -> FastAPI:
    """The FastAPI app serving ``chat`` under the name ``model_id``.

    Args:
        chat: A loaded `vlm_chat.VLMChat`.
        model_id: The name ``/v1/models`` lists and requests must use as ``model``.
        max_batch_size: Most requests in one batched generation.
        max_body_bytes: Request body cap (413 above it).
        max_image_bytes: Decoded image file cap (413 above it).
        max_pixels: Image pixel cap (400 above it).
        max_pending: Requests allowed to wait for the model (503 above it).

    Returns:
        The app; its batcher is ``app.state.batcher`` (closed at shutdown).
    """
    batcher = Batcher(chat, max_batch_size=max_batch_size)
    created = int(time.time())
    caps = {"max_image_bytes": max_image_bytes, "max_pixels": max_pixels}

    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="vlm-chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "vlm-chat"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_id!r}", "model",
                           "model_not_found")
        return model_card

    def prepare(req: ChatCompletionRequest) -> GenerationRequest:
        """Validate and encode in a worker thread (image decoding and tokenizing are CPU work)."""
        conv = to_conversation(req.messages, chat.processor.image_token, **caps)
        max_new = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_NEW_TOKENS
        try:
            sampling = generation_kwargs(None, req.temperature, req.top_p)
        except ValueError as e:
            raise APIError(400, str(e), "temperature") from e
        try:
            prompt = chat.processor.content_text(conv.prompt)
            encoded = chat.processor.encode_prompt(prompt, conv.history, has_image=conv.image is not None,
                                                   reserve=max_new)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"the model cannot take this conversation: {e}", "messages") from e
        return GenerationRequest(conv.image, prompt, conv.history, max_new_tokens=max_new, sampling=sampling,
                                 seed=req.seed, stop=_stop_list(req.stop), encoded=encoded)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_json(request, max_body_bytes)
        try:
            req = ChatCompletionRequest.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], where or None) from e
        if req.model != model_id:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_id!r}", "model",
                           "model_not_found")
        _refuse_unsupported(req)
        job = await run_in_threadpool(prepare, req)
        if batcher.pending() >= max_pending:
            raise APIError(503, f"the server has {max_pending} requests waiting; retry later", code="server_busy",
                           type_="server_error")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(batcher, job, head, include_usage), media_type="text/event-stream")
        result = await _wait_unless_gone(batcher, job, request)
        return {
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result),
        }

    return app


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _generation_error(e: BaseException) -> APIError:
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, f"the model refused this request: {e}", "messages")
    logger.error("generation failed: %r", e)
    return APIError(500, "generation failed; see the server log", code="internal_error", type_="server_error")


async def _wait_unless_gone(batcher: Batcher, job: GenerationRequest, request: Request):
    """Wait for a non-streamed answer; if the client disconnects first, cancel its row (it frees the batch)."""
    future = asyncio.wrap_future(batcher.submit(job))
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            job.cancelled.set()
    try:
        return future.result()
    except Exception as e:
        raise _generation_error(e) from e


async def _stream(batcher: Batcher, job: GenerationRequest, head: dict[str, Any], include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    end = object()
    job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    chunk = {**head, "object": "chat.completion.chunk"}
    try:
        future = batcher.submit(job)
        # on_text runs before the future resolves, in the same thread, so `end` is queued after the last piece.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, end))
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
        while (piece := await pieces.get()) is not end:
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        try:
            result = future.result()
        except Exception as e:
            yield _sse(_generation_error(e).body())
        else:
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason}]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"
    finally:
        # Normal end, or the client went away (Starlette cancels this generator): its row stops at the next token.
        job.cancelled.set()


# ------------------------------------------------------------------------------------------------ running it
class RunningServer:
    """A uvicorn server started in a background thread (tests, benchmarks, notebooks); ``stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="vlm-chat-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model: str | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_API_PORT,
          max_batch_size: int = 8) -> None:
    """Load a model once and serve the API until interrupted (``vlm-chat api``).

    Args:
        model: Checkpoint directory; ``None`` = the shipped demo model.
        host: Address to bind; the default 127.0.0.1 is reachable from this machine only.
        port: TCP port.
        max_batch_size: Most requests in one batched generation.
    """
    import uvicorn

    from vlm_chat.serving import load_model, resolve_model_dir

    model_id = Path(resolve_model_dir(model)).name
    app = create_app(load_model(model), model_id=model_id, max_batch_size=max_batch_size)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the API is reachable from other machines on this network", host)
    logger.info("serving %r at http://%s:%d/v1", model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
