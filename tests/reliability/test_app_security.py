"""The Gradio app's safety defaults: loopback only, no share link, an upload size cap, no files outside its cache."""

from __future__ import annotations

import socket

import httpx
import pytest

from reliability.inputs import REPO, png_bytes, scene


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def default_server(chat):
    """The app launched with every safety-relevant setting left at its default (only the port is chosen)."""
    import gradio.networking

    from vlm_chat.app import build_app, launch_app

    tunnels = []
    original = gradio.networking.setup_tunnel
    gradio.networking.setup_tunnel = lambda *a, **k: tunnels.append(a) or pytest.fail("a share tunnel was opened")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_SHARE", "True")  # an environment that asks Gradio to share must not override our default
    demo = build_app(chat)
    port = _free_port()
    try:
        url = launch_app(demo, port=port, block=False)
        yield demo, url, port, tunnels
    finally:
        demo.close()
        mp.undo()
        gradio.networking.setup_tunnel = original


def test_app_binds_loopback_only_by_default(default_server):
    import psutil

    from vlm_chat.cli import build_parser

    demo, url, port, _ = default_server
    assert url.startswith("http://127.0.0.1:") and demo.server_name == "127.0.0.1"
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"  # `vlm-chat serve` and `python app.py`


def test_app_opens_no_share_link_unless_asked(default_server):
    from vlm_chat.cli import build_parser

    demo, _, _, tunnels = default_server
    assert demo.share is False and demo.share_url is None and tunnels == []
    assert build_parser().parse_args(["serve"]).share is False
    assert build_parser().parse_args(["serve", "--share"]).share is True


def test_app_caps_upload_size_by_default(default_server):
    """20 MB by default (tests/test_app.py checks a custom cap end to end through gradio_client)."""
    demo, url, _, _ = default_server
    assert demo.max_file_size == 20 * 1024 * 1024
    upload = url.rstrip("/") + "/gradio_api/upload"
    assert httpx.post(upload, files={"files": ("big.png", b"\0" * (20 * 1024 * 1024 + 1))}).status_code == 413
    assert httpx.post(upload, files={"files": ("ok.png", png_bytes(scene()))}).status_code == 200


def test_app_serves_no_files_outside_its_upload_cache(default_server, ckpt, files):
    """The model, the repository and the system stay private even though the app reads them."""
    _, url, _, _ = default_server
    for path in [
        "/etc/passwd",
        REPO / "pyproject.toml",
        ckpt / "config.json",
        ckpt / "mapper.safetensors",
        files["png16"],
        REPO / "vlm_chat" / "assets" / "examples.json",
    ]:
        response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}")
        assert response.status_code == 403, (path, response.status_code)


