"""The web UI in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Runs the app on a tiny random checkpoint, uploads an image, asks, waits for the streamed answer, asks a follow-up,
checks a bad request shows a message, and saves a screenshot (its path is printed). The slow test starts the
README's first command, ``python app.py``, on the shipped demo model and checks its answers are right. Skips when
Chromium or Playwright is missing, except under ``CI=true``, where that fails; ``.ci/browser-deps`` installs Chromium.
Never run ``playwright install``: the system browser is used.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_chat import VLMChat
from vlm_chat.app import UISettings, build_app, launch_app
from vlm_chat.datasets import easyvqa
from vlm_chat.serving import DEFAULT_PORT

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("VLM_CHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vlm_chat" / "assets" / "shapes_seed7_4.png"
SCREENSHOT_DIR = Path(os.environ.get("VLM_CHAT_ARTIFACTS", Path(__file__).resolve().parent / "_artifacts"))
GEN = {"max_new_tokens": 12, "do_sample": False}
TIMEOUT_MS = 60_000


def _words(text: str) -> str:
    # The chatbot renders markdown; compare the letters and digits, which rendering does not change.
    return re.sub(r"[\W_]+", "", text)




@pytest.fixture(scope="module")
def browser():
    # CI promises a browser (.ci/browser-deps): there a missing one is a failure, not a silent skip.
    missing = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    if not Path(CHROMIUM).is_file() or not shutil.which(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM}: install it with .ci/browser-deps (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_clip_dir, tiny_llama_dir):
    path = tmp_path_factory.mktemp("tiny_vlm_browser")
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    chat = VLMChat.from_pretrained(path, device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(chat, UISettings(max_new_tokens=GEN["max_new_tokens"]), model_name="tiny test checkpoint")
    url = launch_app(demo, host="127.0.0.1", port=port, block=False, max_file_size="200kb")
    yield url, chat
    demo.close()


def _wait_for_answer(page, n_answers: int) -> str:
    """Wait until the n-th bot message is complete (the chatbot's progress tracker hidden again); return its text."""
    bot = page.locator("#vlm-chatbot [data-testid='bot']")
    page.wait_for_function(
        """n => {
            const msgs = document.querySelectorAll("#vlm-chatbot [data-testid='bot']");
            const tracker = document.querySelector("#vlm-chatbot [data-testid='status-tracker']");
            return msgs.length >= n && msgs[n - 1].innerText.trim().length > 0
                && (!tracker || tracker.classList.contains("hide"));
        }""",
        arg=n_answers,
        timeout=TIMEOUT_MS,
    )
    return bot.nth(n_answers - 1).inner_text()


def test_chat_in_a_real_browser(browser, served, capsys, tmp_path):
    url, chat = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.locator("#vlm-image input[type=file]").set_input_files(str(ASSET))
    question = page.locator("#vlm-question textarea")
    question.fill("Where is the green circle?")
    page.locator("#vlm-send").click()
    answer = _wait_for_answer(page, 1)
    assert answer.strip()
    assert _words(answer) == _words(chat.generate(str(ASSET), "Where is the green circle?", **GEN))
    assert question.input_value() == ""  # the box is cleared for the next question

    # A follow-up (Enter) continues the same conversation: the model sees the first exchange as history.
    question.fill("And the red triangle?")
    question.press("Enter")
    follow_up = _wait_for_answer(page, 2)
    history = [
        {"role": "user", "content": "Where is the green circle?"},
        {"role": "assistant", "content": chat.generate(str(ASSET), "Where is the green circle?", **GEN)},
    ]
    expected = chat.generate(str(ASSET), "And the red triangle?", history=history, **GEN)
    assert _words(follow_up) == _words(expected)
    assert page.locator("#vlm-chatbot [data-testid='user']").count() == 2

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "app_chat.png"
    page.screenshot(path=str(shot), full_page=True)

    # An empty question is a message in the page, and the conversation is untouched.
    page.locator("#vlm-send").click()
    page.get_by_text("Type a question about the image first.").first.wait_for()
    assert page.locator("#vlm-chatbot [data-testid='bot']").count() == 2

    # Picking an example loads its image and question, and a new image starts a new conversation.
    page.locator("#vlm-examples tbody tr").first.click()
    page.wait_for_function("() => !document.querySelector(\"#vlm-chatbot [data-testid='bot']\")")
    assert question.input_value().endswith("?")

    # An upload over the size cap is refused with a message; the next upload and question still work.
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big = tmp_path / "big noise.png"
    Image.fromarray(noise).save(big)  # ~270 kB of incompressible pixels; the cap is 200 kB
    page.locator("#vlm-image input[type=file]").set_input_files(str(big))
    page.get_by_text("exceed the maximum allowed size").first.wait_for()
    page.locator("#vlm-image input[type=file]").set_input_files(str(ASSET))
    question.fill("Where is the green circle?")
    page.locator("#vlm-send").click()
    assert _words(_wait_for_answer(page, 1)) == _words(history[1]["content"])
    page.close()
    with capsys.disabled():
        print(f"\nbrowser screenshot: {shot}")
    assert shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def readme_app(tmp_path_factory):
    """``python app.py`` started as the README says, from the repository root; yields its URL.

    The README's port (7860) when it is free; another one (``--port``) only when something else holds it.
    """
    port = DEFAULT_PORT if _port_is_free(DEFAULT_PORT) else _free_port()
    cmd = [sys.executable, "app.py"] + ([] if port == DEFAULT_PORT else ["--port", str(port)])
    log = tmp_path_factory.mktemp("readme_app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 600  # the first load of the demo converts SmolLM2's GGUF (~40 s), then cached
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`python app.py` exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`python app.py` did not serve {url} within 600 s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_readme_first_command_answers_right_in_a_browser(browser, readme_app):
    """The README's first command on the shipped demo: upload easy-VQA test pictures, ask, check the answers are the
    data set's own labels (not merely equal to another code path's)."""
    samples = [s for s in easyvqa.load_split("test") if s.question.startswith("what is the color of the")][:2]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS * 3)  # the demo's LLM on two CPU cores
    page.goto(readme_app)
    for sample in samples:
        page.locator("#vlm-image input[type=file]").set_input_files(sample.image)  # a new image: a new conversation
        page.wait_for_function("() => !document.querySelector(\"#vlm-chatbot [data-testid='bot']\")")
        page.locator("#vlm-question textarea").fill("What color is the shape?")
        page.locator("#vlm-send").click()
        answer = _wait_for_answer(page, 1)
        assert _words(answer).lower() == sample.answer, (sample, answer)
    page.close()
