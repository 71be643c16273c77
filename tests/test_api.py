"""The OpenAI-compatible server, driven by the official ``openai`` client against a real uvicorn on 127.0.0.1.

A tiny random VLM (CLIP + Llama at hidden size 32) answers gibberish, but greedily and so deterministically: every
answer is checked against the library call it must equal (``VLMChat.generate``), batched or not, streamed or not.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import make_image
from PIL import Image

from vlm_chat import VLMChat
from vlm_chat.api import RunningServer, create_app

MAX = 6
MODEL = "tiny"
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
SMALL_CAPS = {"max_body_bytes": 300_000, "max_image_bytes": 100_000, "max_pixels": 300 * 300}


@pytest.fixture(scope="module")
def chat(tmp_path_factory, tiny_clip_dir, tiny_llama_dir):
    path = tmp_path_factory.mktemp("tiny_vlm_api")
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return VLMChat.from_pretrained(path, device="cpu")


@pytest.fixture(scope="module")
def server(chat):
    app = create_app(chat, model_id=MODEL, **SMALL_CAPS)
    running = RunningServer(app, port=0)  # port 0: the OS picks a free one
    yield running, app
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user(question: str, img=None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(img)}}] if img is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def ask(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", MAX), **kw)


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_with_an_image_is_the_library_answer_with_usage(client, chat):
    img = make_image()
    reply = ask(client, [user("What color is the shape?", img)])
    assert reply.choices[0].message.content == chat.generate(img, "What color is the shape?", max_new_tokens=MAX)
    assert reply.choices[0].finish_reason == "length"  # a random model does not stop by itself within 6 tokens
    assert reply.object == "chat.completion" and reply.model == MODEL
    # Prompt tokens: the rendered chat template, with the one <image> token expanded to the visual tokens.
    rendered = chat.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the shape?"}], add_generation_prompt=True, tokenize=False)
    text_tokens = len(chat.processor.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert chat.config.num_image_tokens == 16  # 32-pixel images, 8-pixel patches, CLS dropped
    assert reply.usage.prompt_tokens == text_tokens - 1 + 16
    assert reply.usage.completion_tokens == MAX
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX


def test_string_content_system_and_history_map_to_the_library(client, chat):
    img = make_image((30, 60, 220), "square")
    history = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": "A square."}]
    messages = [{"role": "system", "content": "Answer briefly."}, user("What is it?", img),
                {"role": "assistant", "content": "A square."}, {"role": "user", "content": "And its color?"}]
    expected = chat.generate(img, "And its color?", history=history, max_new_tokens=MAX)
    assert ask(client, messages).choices[0].message.content == expected
    text_only = ask(client, [{"role": "user", "content": "Hello there"}]).choices[0].message.content
    assert text_only == chat.generate(None, "Hello there", max_new_tokens=MAX)


def test_streaming_sends_the_same_answer_in_openai_chunks(client, chat, server):
    img = make_image()
    whole = ask(client, [user("Describe it.", img)], max_tokens=8)
    chunks = list(ask(client, [user("Describe it.", img)], max_tokens=8, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    with httpx.stream("POST", f"{server[0].url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [user("Hi", img)], "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, stream):
    img = make_image()
    full = ask(client, [user("What is it?", img)], max_tokens=10).choices[0].message.content
    # A stop string from the middle of the known answer (letters only: no whitespace the answer's strip would eat).
    cut_at = next(k for k in range(len(full) // 2, len(full) - 3) if full[k:k + 3].isalpha())
    stop = full[cut_at:cut_at + 3]
    if stream:
        chunks = list(ask(client, [user("What is it?", img)], max_tokens=10, stop=[stop], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        reply = ask(client, [user("What is it?", img)], max_tokens=10, stop=stop)
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == full[:full.index(stop)].strip() and reason == "stop"


def test_max_completion_tokens_and_seeded_sampling(client, chat):
    img = make_image()
    reply = client.chat.completions.create(model=MODEL, messages=[user("Count.", img)], max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == chat.generate(img, "Count.", max_new_tokens=3)
    a, b, c = (ask(client, [user("Count.", img)], temperature=1.0, seed=s).choices[0].message.content
               for s in (7, 7, 8))
    assert a == b and a != c


def _error(exc_info) -> dict:
    return exc_info.value.body


@pytest.mark.parametrize("messages, kw, status, param, code", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}},
                                   {"type": "text", "text": "Hi"}]}], {}, 400, "messages[0].content[0].image_url",
     "invalid_image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                                   {"type": "text", "text": "Hi"}]}], {}, 400, "messages[0].content[0].image_url",
     "remote_url_not_supported"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                   {"type": "text", "text": "Hi"}]}], {}, 400, "messages[0].content[0].image_url",
     None),
    ([{"role": "user", "content": "Hi"}], {"n": 2}, 400, "n", None),
    ([{"role": "user", "content": "Hi"}], {"max_tokens": 0}, 400, "max_tokens", None),
    ([{"role": "user", "content": "Hi"}], {"temperature": 3}, 400, "temperature", None),
    ([{"role": "user", "content": "Hi"}], {"max_tokens": 100_000}, 400, "messages", None),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"}], {}, 400, "messages[1]", None),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "Hi"}], {},
     400, "messages[1]", None),
    ([{"role": "tool", "content": "x"}], {}, 400, "messages[0].role", None),
    ([{"role": "user", "content": "look: <image>"}], {}, 400, "messages[0].content[0]", None),
    ([], {}, 400, "messages", None),
])
def test_bad_requests_get_openai_errors(client, messages, kw, status, param, code):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, messages, **{"max_tokens": MAX, **kw})
    assert e.value.status_code == status
    err = _error(e)
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["code"] == code and err["message"]


def test_images_and_bodies_over_the_caps_are_refused(client, server):
    two = [user("Hi", make_image()), {"role": "assistant", "content": "ok"}, user("And this?", make_image())]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, two)
    assert _error(e)["code"] == "too_many_images" and _error(e)["param"] == "messages[2].content[0]"
    with pytest.raises(openai.BadRequestError) as e:  # 400x400 = 160,000 pixels, over the 90,000 cap
        ask(client, [user("Hi", make_image(size=400))])
    assert "over the limit of 90,000" in _error(e)["message"]
    # Noise does not compress: a 200x200 PNG of it is ~120 kB, over the 100 kB image cap (and under the body cap).
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, [user("Hi", noise)])
    assert e.value.status_code == 413 and _error(e)["code"] == "image_too_large"
    r = httpx.post(f"{server[0].url}/v1/chat/completions", content=b"{" + b" " * 400_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{server[0].url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert _error(e)["code"] == "model_not_found"
    r = httpx.get(f"{server[0].url}/v2/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_are_batched_and_answer_as_one_at_a_time(client, chat, server):
    batcher = server[1].state.batcher
    img = make_image()
    questions = [(f"Question number {k}?", 3 + k) for k in range(5)]  # each with its own token budget
    expected = {q: chat.generate(img, q, max_new_tokens=n) for q, n in questions}
    before = len(batcher.batch_sizes)
    answers: dict[str, str] = {}

    def one(q: str, n: int) -> None:
        answers[q] = ask(client, [user(q, img)], max_tokens=n).choices[0].message.content

    # A first request holds the model (the test holds its lock, so the timing is the test's, not the machine's);
    # the five that arrive meanwhile must join one batch after it.
    first = threading.Thread(target=one, args=("Take your time.", MAX))
    threads = [threading.Thread(target=one, args=qn) for qn in questions]
    with chat.lock:
        first.start()
        deadline = time.monotonic() + 60
        while len(batcher.batch_sizes) == before:  # taken by the batcher, waiting for the model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for t in threads:
            t.start()
        while batcher.pending() < len(questions):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in [first, *threads]:
        t.join()
    assert batcher.batch_sizes[before:] == [1, 5]
    assert {q: answers[q] for q, _ in questions} == expected
    streamed = {}

    def one_stream(q: str, n: int) -> None:
        chunks = ask(client, [user(q, img)], max_tokens=n, stream=True)
        streamed[q] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=one_stream, args=qn) for qn in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert streamed == expected


def test_an_abandoned_stream_frees_the_model_at_once(client, chat, server, monkeypatch):
    """Issue 19: a client leaving mid-stream stops its row; the next request does not wait for its 400 tokens."""
    batcher = server[1].state.batcher
    jobs = []
    submit = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda job: jobs.append(job) or submit(job))
    img = make_image()
    start = time.perf_counter()
    ask(client, [user("Short.", img)], max_tokens=MAX)
    per_token = (time.perf_counter() - start) / MAX  # an upper bound: it includes the request's own overhead
    stream = ask(client, [user("Go on and on.", img)], max_tokens=400, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-answer
    start = time.perf_counter()
    reply = ask(client, [user("Short.", img)], max_tokens=MAX)
    waited = time.perf_counter() - start
    assert reply.choices[0].message.content == chat.generate(img, "Short.", max_new_tokens=MAX)
    # Had the abandoned row run on, this request would have waited for ~396 more tokens.
    assert waited < 0.25 * 396 * per_token, (waited, per_token)
    abandoned = jobs[1].future.result(timeout=0)
    assert abandoned.finish_reason == "cancelled" and abandoned.completion_tokens < 20, abandoned


def test_a_client_that_times_out_frees_the_model(client, server, chat, monkeypatch):
    import functools

    batcher = server[1].state.batcher
    lm = chat.model.causal_lm
    forward = lm.forward

    @functools.wraps(forward)  # keeps the signature generate() inspects
    def slow_forward(*args, **kwargs):
        time.sleep(0.02)  # 400 tokens take >= 8 s whatever the machine's speed, so the client's 1.5 s always runs out
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", slow_forward)
    jobs = []
    submit = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda job: jobs.append(job) or submit(job))
    impatient = client.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, [user("Go on and on.", make_image())], max_tokens=400)
    abandoned = jobs[0].future.result(timeout=30)
    assert abandoned.finish_reason == "cancelled" and abandoned.completion_tokens < 400, abandoned


def test_the_cli_serves_the_api(chat, tmp_path):
    """``vlm-chat api --model DIR --port P`` as a user runs it: the model is listed under its directory's name."""
    import os
    import socket
    import subprocess
    import sys

    model_dir = tmp_path / "my_model"
    chat.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vlm_chat.cli", "api", "--model", str(model_dir), "--port",
                             str(port)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == ["my_model"]
        cli_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = cli_client.chat.completions.create(model="my_model", max_tokens=MAX,
                                                   messages=[{"role": "user", "content": "Hello there"}])
        assert reply.choices[0].message.content == chat.generate(None, "Hello there", max_new_tokens=MAX)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_one_bad_request_does_not_spoil_its_batch(chat):
    """Batcher level: in one batch, a prompt that cannot fit fails alone and a consumer that breaks loses its row
    alone; the neighbours get their one-at-a-time answers."""
    from vlm_chat.serving import Batcher, GenerationRequest

    img = make_image()

    def broken(piece: str) -> None:
        raise RuntimeError("the client's event loop is gone")

    batcher = Batcher(chat, max_batch_size=4)
    try:
        jobs = [GenerationRequest(img, "What is it?", max_new_tokens=MAX),
                GenerationRequest(img, "Too long?", max_new_tokens=100_000),
                GenerationRequest(img, "Stream it.", max_new_tokens=MAX, on_text=broken),
                GenerationRequest(img, "And the color?", max_new_tokens=4)]
        with batcher._cv:  # queue them all before the worker looks: one batch
            batcher._pending.extend(jobs)
            batcher._cv.notify()
        assert jobs[0].future.result(timeout=120).text == chat.generate(img, "What is it?", max_new_tokens=MAX)
        with pytest.raises(ValueError, match="does not fit in max_length"):
            jobs[1].future.result(timeout=120)
        assert jobs[2].future.result(timeout=120).finish_reason == "cancelled"
        assert jobs[3].future.result(timeout=120).text == chat.generate(img, "And the color?", max_new_tokens=4)
        assert batcher.batch_sizes == [3]
    finally:
        batcher.close()
