"""The Gradio app: handlers called directly, then the real server driven by ``gradio_client``.

A tiny random VLM (CLIP + Llama at hidden size 32) is served on a free 127.0.0.1 port. Its answers are gibberish but
deterministic (greedy), so every endpoint is checked against the library call it must equal.
"""

from __future__ import annotations

import socket
import threading
import time

import gradio as gr
import httpx
import pytest
from conftest import make_image

from vlm_chat import VLMChat
from vlm_chat.app import ChatHandlers, UISettings, build_app, launch_app
from vlm_chat.serving import default_examples

MAX_NEW = 6
GEN = {"max_new_tokens": MAX_NEW, "do_sample": False}
UI_SETTINGS = (MAX_NEW, 0.0, 0.9)  # the Settings sliders: max new tokens, temperature, top-p
MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory, tiny_clip_dir, tiny_llama_dir):
    path = tmp_path_factory.mktemp("tiny_vlm")
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir):
    return VLMChat.from_pretrained(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("app_images")
    paths = {"red": d / "red.png", "blue": d / "blue.png", "big": d / "big.png", "fake": d / "fake.png"}
    make_image().save(paths["red"])
    make_image((30, 60, 220), "square").save(paths["blue"])
    make_image(size=400).save(paths["big"])  # 160,000 pixels: over MAX_PIXELS
    paths["fake"].write_text("this is not a PNG")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def handlers(chat):
    return ChatHandlers(chat, UISettings(max_new_tokens=MAX_NEW, max_pixels=MAX_PIXELS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat):
    from gradio_client import Client

    demo = build_app(chat, UISettings(max_new_tokens=MAX_NEW, max_pixels=MAX_PIXELS), model_name="tiny")
    url = launch_app(demo, host="127.0.0.1", port=_free_port(), max_file_size="100kb", block=False)
    yield url, Client(url, verbose=False)
    demo.close()


# ---------------------------------------------------------------------------------------------------- handlers


def test_chat_streams_and_keeps_the_conversation(handlers, chat, images):
    steps = list(handlers.respond(images["red"], "  What color is it? ", [], *UI_SETTINGS))
    chatbot, turns, box = steps[-1]
    first = chat.generate(images["red"], "What color is it?", **GEN)
    assert turns == [{"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": first}]
    assert box == ""  # the question box is cleared
    texts = [s[1][-1]["content"] for s in steps]
    assert len(set(texts)) > 2  # streamed piece by piece...
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # ...each step extending the last
    assert steps[0][0] == [{"role": "user", "content": "What color is it?"}]  # the question shows at once

    # A follow-up sends the first exchange as history: the answer equals the library's multi-turn answer.
    *_, (chatbot2, turns2, _) = handlers.respond(images["red"], "And its shape?", turns, *UI_SETTINGS)
    second = chat.generate(images["red"], "And its shape?", history=turns, **GEN)
    assert turns2[:2] == turns and turns2[2:] == [
        {"role": "user", "content": "And its shape?"},
        {"role": "assistant", "content": second},
    ]
    assert chatbot == turns and chatbot2 == turns2  # non-empty answers are shown as they are


def test_an_empty_answer_is_shown_as_such():
    from vlm_chat.app import _display

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    assert _display(turns)[1]["content"] == "_(empty answer)_"  # not an invisible bubble
    assert turns[1]["content"] == " "  # the history the model sees is untouched


def test_retry_replaces_the_last_answer(handlers, chat, images):
    *_, (_, turns, _) = handlers.respond(images["blue"], "Describe it.", [], *UI_SETTINGS)
    broken = [*turns[:-1], {"role": "assistant", "content": "half an ans"}]  # e.g. a generation that failed
    *_, (_, retried) = handlers.retry(images["blue"], broken, *UI_SETTINGS)
    assert retried == turns  # same length, greedy gives the same answer again
    with pytest.raises(gr.Error, match="Nothing to retry"):
        list(handlers.retry(images["blue"], [], *UI_SETTINGS))


@pytest.mark.parametrize(
    ("image", "question", "message"),
    [
        (None, "What is it?", "No image"),
        ("red", "   ", "Type a question"),
        ("red", "x" * 5000, "5,000 characters"),
        ("fake", "What is it?", "not a readable image"),
        ("big", "What is it?", "over the limit"),
        ("missing", "What is it?", "not found"),
    ],
)
def test_bad_chat_input_is_a_clear_message(handlers, images, image, question, message):
    path = images.get(image, "/nonexistent/x.png") if image else None
    with pytest.raises(gr.Error, match=message) as err:
        list(handlers.respond(path, question, [], *UI_SETTINGS))
    assert "/tmp" not in str(err.value) or image == "missing"  # upload temp paths are not shown to the user


def test_captions_match_the_library(handlers, chat, images):
    assert handlers.caption(images["red"], False, *UI_SETTINGS) == chat.caption(images["red"], **GEN)
    assert handlers.caption(images["red"], True, *UI_SETTINGS) == chat.caption(images["red"], detailed=True, **GEN)
    with pytest.raises(gr.Error, match="No image"):
        handlers.caption(None, False, *UI_SETTINGS)


def test_sampling_settings_reach_the_model(handlers, images):
    import torch

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return handlers.caption(images["red"], False, 12, 1.5, 1.0)  # temperature 1.5: sampling

    greedy = handlers.caption(images["red"], False, 12, 0.0, 1.0)
    assert sample(0) == sample(0)  # seeded sampling is reproducible
    assert any(sample(seed) != greedy for seed in range(3))  # and it is not greedy decoding


def test_examples_exist_and_load():
    from vlm_chat.images import load_image

    examples = default_examples()
    assert len(examples) >= 4
    for path, question in examples:
        load_image(path)
        assert question.strip().endswith("?")


# ---------------------------------------------------------------------------------------------------- server


def test_api_endpoints_answer_and_caption(server, chat, images):
    from gradio_client import handle_file

    _, client = server
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == {"/answer", "/caption"}  # the UI's internal events are not part of the API
    answer = client.predict(handle_file(images["red"]), "What color is the shape?", api_name="/answer")
    assert answer == chat.generate(images["red"], "What color is the shape?", **GEN)
    assert client.predict(handle_file(images["blue"]), api_name="/caption") == chat.caption(images["blue"], **GEN)


def test_bad_requests_get_messages_and_the_server_keeps_working(server, chat, images):
    from gradio_client import handle_file

    _, client = server
    expected = chat.generate(images["blue"], "What is it?", **GEN)
    bad = [
        ((handle_file(images["fake"]), "What is it?"), "/answer", "fake.png: it is not a readable image"),
        ((handle_file(images["big"]), "What is it?"), "/answer", "over the limit"),
        ((handle_file(images["red"]), ""), "/answer", "Type a question"),
        ((None, "What is it?"), "/answer", "No image"),
        ((None,), "/caption", "No image"),
    ]
    for args, endpoint, message in bad:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name=endpoint)
        # The next request on the same client still works.
        assert client.predict(handle_file(images["blue"]), "What is it?", api_name="/answer") == expected


def test_upload_over_the_size_cap_is_refused(server, chat, images, tmp_path):
    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    _, client = server
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")  # ~120 kB of incompressible pixels, cap is 100 kB
    assert (tmp_path / "noise.png").stat().st_size > 100_000
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        client.predict(handle_file(str(tmp_path / "noise.png")), "What is it?", api_name="/answer")
    # The server enforces the cap itself, whatever the client does.
    url, _ = server
    upload = url.rstrip("/") + "/gradio_api/upload"
    assert httpx.post(upload, files={"files": ("big.png", b"x" * 150_000)}).status_code == 413
    assert httpx.post(upload, files={"files": ("ok.png", b"x" * 1_000)}).status_code == 200
    expected = chat.caption(images["red"], **GEN)
    assert client.predict(handle_file(images["red"]), api_name="/caption") == expected


def test_concurrent_clients_get_the_single_client_answers(server, chat, images):
    from gradio_client import Client, handle_file

    url, _ = server
    questions = ["What color is it?", "Is it round?", "Where is it?"]
    expected = {q: chat.generate(images["red"], q, **GEN) for q in questions}
    results, errors = [], []

    def client_run(k: int):
        try:
            client = Client(url, verbose=False)
            for i in range(3):
                q = questions[(k + i) % len(questions)]
                results.append((q, client.predict(handle_file(images["red"]), q, api_name="/answer")))
        except Exception as e:  # collected and asserted below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=client_run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(results) == 12 and all(answer == expected[q] for q, answer in results)


def _count_generated(chat, monkeypatch) -> list[int]:
    """Record how many tokens each generation call made (its output is ``[B, T_new]``)."""
    lengths: list[int] = []
    inner = chat._generate_ids

    def counted(*args, **kwargs):
        out = inner(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(chat, "_generate_ids", counted)
    return lengths


def test_a_closed_chat_stream_frees_the_model_at_the_next_token(handlers, chat, images, monkeypatch):
    """Issue 19: the handler's generator closed mid-answer (what Gradio does when the client leaves) stops the model."""
    lengths = _count_generated(chat, monkeypatch)
    updates = handlers.respond(images["red"], "Go on and on.", [], 300, 0.0, 0.9)
    next(updates), next(updates)  # the question shown, then the first piece of the answer
    updates.close()
    assert chat.lock.acquire(blocking=False)  # free as soon as close() returns: the worker has stopped
    chat.lock.release()
    assert len(lengths) == 1 and lengths[0] < 10, lengths  # not the 300 tokens asked for


def test_a_client_leaving_mid_stream_does_not_hold_up_the_next_one(server, chat, images, monkeypatch):
    """The real server: a browser-protocol client streams a 300-token answer and disconnects after a few pieces; its
    generation stops there, and the next request does not wait for the rest of it."""
    url, _ = server
    api = f"{url.rstrip('/')}/gradio_api"

    def streamed(question: str, n: int) -> str:  # through chat.stream, in a worker thread, as the app generates
        return "".join(chat.stream(images["red"], question, max_new_tokens=n, do_sample=False))

    expected = streamed("Short.", MAX_NEW)  # also warms the model up for the timing below
    start = time.perf_counter()
    streamed("Go on and on.", 30)  # a random model: no early stop within 30
    per_token = (time.perf_counter() - start) / 30
    lengths = _count_generated(chat, monkeypatch)
    deps = httpx.get(f"{url.rstrip('/')}/config").json()["dependencies"]
    fn_index = next(i for i, d in enumerate(deps) if d.get("api_name") == "respond")
    with open(images["red"], "rb") as f:
        path = httpx.post(f"{api}/upload", files={"files": ("red.png", f.read())}).json()[0]
    image = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "red.png"}
    join = httpx.post(f"{api}/queue/join", json={"data": [image, "Go on and on.", [], 300, 0.0, 0.9],
                                                 "fn_index": fn_index, "session_hash": "leaver", "event_data": None})
    assert join.status_code == 200, join.text
    pieces = 0
    with httpx.stream("GET", f"{api}/queue/data", params={"session_hash": "leaver"}, timeout=60) as r:
        for line in r.iter_lines():
            pieces += '"process_generating"' in line
            assert '"process_completed"' not in line, line  # it must still be generating when we leave
            if pieces == 4:
                break  # leaving the block closes the connection: the page was closed
    start = time.perf_counter()
    assert streamed("Short.", MAX_NEW) == expected
    waited = time.perf_counter() - start
    assert lengths[0] < 50, lengths  # the abandoned generation stopped soon after the client left, not at 300
    assert waited < 0.25 * 290 * per_token, (waited, per_token)


def test_stream_stop_event_ends_the_answer_early(chat, images, monkeypatch):
    lengths = _count_generated(chat, monkeypatch)
    stop = threading.Event()
    pieces = []
    for piece in chat.stream(images["red"], "Go on and on.", max_new_tokens=300, do_sample=False, stop_event=stop):
        pieces.append(piece)
        if len(pieces) == 2:
            stop.set()  # e.g. a Stop button: the pieces so far stay, generation ends at the next token
    assert len(lengths) == 1 and lengths[0] < 20, lengths  # not the 300 asked for
    # The streamed text is exactly the answer of that many tokens: nothing lost, nothing extra.
    assert "".join(pieces) == chat.generate(images["red"], "Go on and on.", max_new_tokens=lengths[0])
