"""The app under load: ``python app.py`` on a tiny model, 8 concurrent ``gradio_client`` clients x 25 requests each.

Every request must succeed and get exactly the answer a lone client gets (greedy decoding is deterministic), also when
the server runs several generations at once (``--concurrency 4``: the model's lock must keep them apart). The p50/p95
latencies go to stdout (``pytest -s``) and are reported in docs/reliability.md. Slow (about a minute per server
setting on 2 CPU cores): ``pytest -m slow tests/test_load.py -s``.

tests/test_app.py::test_concurrent_clients_get_the_single_client_answers is the quick version (4 x 3, in-process).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from vlm_chat import VLMChat

REPO = Path(__file__).resolve().parents[1]
CLIENTS, REQUESTS = 8, 25
MAX_NEW = 8
QUESTIONS = ["What color is the shape?", "Is it round?", "Where is it?", "How many shapes are there?",
             "Describe the picture."]  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip_dir, tiny_llama_dir) -> Path:
    path = tmp_path_factory.mktemp("load_model") / "model"
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("load_images")
    paths = []
    for i, (color, box) in enumerate([((220, 40, 40), (8, 8, 40, 40)), ((30, 60, 220), (20, 4, 60, 30)),
                                      ((40, 180, 40), (2, 30, 30, 62)), ((240, 200, 20), (30, 30, 60, 60))]):  # fmt: skip
        img = Image.new("RGB", (64, 64), (200, 200, 200))
        (ImageDraw.Draw(img).ellipse if i % 2 else ImageDraw.Draw(img).rectangle)(box, fill=color)
        paths.append(str(d / f"shape{i}.png"))
        img.save(paths[-1])
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(model_dir: Path, concurrency: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``python app.py`` exactly as a user starts it (no --host: the default must be loopback)."""
    port = _free_port()
    cmd = [sys.executable, "app.py", "--model", str(model_dir), "--port", str(port), "--max-new-tokens", str(MAX_NEW),
           "--concurrency", str(concurrency)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the app did not come up within 180 s:\n{log.read_text()[-3000:]}")


def _requests(images: list[str]) -> list[list[tuple[str, str | None]]]:
    """Per client, 25 (image, question) requests; question None = the /caption endpoint. Mixed so that neighbours in
    the queue ask different things (an answer leaking to the wrong request would show)."""
    plan = []
    for k in range(CLIENTS):
        reqs = []
        for i in range(REQUESTS):
            image = images[(k + i) % len(images)]
            question = None if (k + 2 * i) % 6 == 0 else QUESTIONS[(3 * k + i) % len(QUESTIONS)]
            reqs.append((image, question))
        plan.append(reqs)
    return plan


def _ask(client, image: str, question: str | None) -> str:
    from gradio_client import handle_file

    if question is None:
        return client.predict(handle_file(image), api_name="/caption")
    return client.predict(handle_file(image), question, api_name="/answer")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@pytest.mark.parametrize("concurrency", [1, 4], ids=["default_concurrency_1", "concurrency_4"])
def test_eight_clients_times_25_requests(model_dir, images, tmp_path, concurrency):
    import psutil
    from gradio_client import Client

    chat = VLMChat.from_pretrained(model_dir, device="cpu")
    gen = {"max_new_tokens": MAX_NEW, "do_sample": False}  # what `--max-new-tokens 8` and temperature 0 mean
    library = {(img, q): chat.caption(img, **gen) if q is None else chat.generate(img, q, **gen)
               for img in images for q in [None, *QUESTIONS]}  # fmt: skip
    assert len(set(library.values())) > len(library) // 2  # the answers really differ between requests

    proc, url = _start_app(model_dir, concurrency, tmp_path / "app.log")
    try:
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}  # `python app.py` without --host is reachable from this machine only

        # One client alone: the reference answers and latency.
        single = Client(url, verbose=False)
        alone, alone_latency = {}, []
        for key in library:
            start = time.perf_counter()
            alone[key] = _ask(single, *key)
            alone_latency.append(time.perf_counter() - start)
        assert alone == library

        # Eight clients at once.
        results, errors, latency = [], [], []
        lock = threading.Lock()
        barrier = threading.Barrier(CLIENTS)

        def client_run(reqs):
            try:
                client = Client(url, verbose=False)
                barrier.wait(timeout=120)  # all clients start together
                for image, question in reqs:
                    start = time.perf_counter()
                    answer = _ask(client, image, question)
                    with lock:
                        latency.append(time.perf_counter() - start)
                        results.append(((image, question), answer))
            except Exception as e:  # collected and asserted below; a thread's exception would otherwise vanish
                with lock:
                    errors.append(repr(e))

        threads = [threading.Thread(target=client_run, args=(reqs,)) for reqs in _requests(images)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - wall
        assert proc.poll() is None, "the server died under load"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    assert errors == []
    assert len(results) == CLIENTS * REQUESTS
    wrong = [(key, answer, alone[key]) for key, answer in results if answer != alone[key]]
    assert wrong == []
    print(
        f"\n[load] concurrency={concurrency}: {CLIENTS}x{REQUESTS} requests, 0 failures, all equal to one client's; "
        f"latency p50 {_percentile(latency, 50):.3f} s, p95 {_percentile(latency, 95):.3f} s, "
        f"max {max(latency):.3f} s; {len(results) / wall:.1f} requests/s; "
        f"one client alone: p50 {_percentile(alone_latency, 50):.3f} s, p95 {_percentile(alone_latency, 95):.3f} s"
    )
