"""Command-line habits: ``-`` reads the image or the question from stdin; every error is one line on stderr with
exit 2 (input, flags) or 1 (anything else), a traceback only under ``--debug``; off a terminal, libraries' warnings
and progress bars stay off stderr (the CLI and the training entry points)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_image

from vlm_chat import VLMChat, cli
from vlm_chat.cli import main

ROOT = Path(__file__).resolve().parents[1]
GEN = {"max_new_tokens": 6, "do_sample": False}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory, tiny_clip_dir, tiny_llama_dir):
    path = tmp_path_factory.mktemp("tiny_vlm_habits")
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat(tiny_vlm_dir):
    return VLMChat.from_pretrained(tiny_vlm_dir, device="cpu")


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("habits") / "red circle.png"
    make_image().save(path)
    return path


class _Stdin(io.TextIOWrapper):
    """A piped stdin: text through ``read()``, bytes through ``.buffer``, not a terminal."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="utf-8")

    def isatty(self):
        return False


def _run(capsys, monkeypatch, stdin: bytes | None, *argv):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_image_from_stdin(capsys, monkeypatch, tiny_vlm_dir, chat, png):
    code, out, err = _run(capsys, monkeypatch, png.read_bytes(), "chat", "--model", tiny_vlm_dir, "--image", "-",
                          "What", "color?", "--max-new-tokens", "6")
    assert (code, err) == (0, "")
    assert out == chat.generate(str(png), "What color?", **GEN) + "\n"

    code, out, err = _run(capsys, monkeypatch, png.read_bytes(), "caption", "-", "--model", tiny_vlm_dir,
                          "--max-new-tokens", "6")
    assert (code, err) == (0, "")
    assert out == chat.caption(str(png), **GEN) + "\n"


def test_question_from_stdin(capsys, monkeypatch, tiny_vlm_dir, chat, png):
    code, out, err = _run(capsys, monkeypatch, b"What color is it?\n", "chat", "--model", tiny_vlm_dir, "--image",
                          str(png), "-", "--max-new-tokens", "6")
    assert (code, err) == (0, "")
    assert out == chat.generate(str(png), "What color is it?", **GEN) + "\n"


@pytest.mark.parametrize(
    ("stdin", "argv", "message"),
    [
        (b"x", ["chat", "--image", "-", "-"], "stdin can carry the image (--image -) or the question (-), not both"),
        (b"", ["chat", "--image", "-", "Q?"], "--image -: stdin held no data"),
        (b"not an image at all", ["chat", "--image", "-", "Q?"], "--image -: "),
        (b"", ["caption", "-"], "PATH -: stdin held no data"),
        (b"   \n", ["chat", "-"], "the question is empty"),
    ],
)
def test_bad_stdin_is_one_line_and_exit_2(capsys, monkeypatch, tiny_vlm_dir, stdin, argv, message):
    code, out, err = _run(capsys, monkeypatch, stdin, *argv, "--model", tiny_vlm_dir)
    assert (code, out) == (2, "")
    assert err.startswith(f"vlm-chat {argv[0]}: error: {message}")
    assert err.count("\n") == 1


def test_stdin_that_is_a_terminal_is_refused(capsys, monkeypatch, tiny_vlm_dir):
    class Terminal(_Stdin):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(b""))
    assert main(["chat", "--model", tiny_vlm_dir, "--image", "-", "Q?"]) == 2
    assert capsys.readouterr().err == "vlm-chat chat: error: --image -: stdin is a terminal; pipe the image in, " \
                                      "e.g. `< cat.png`\n"


def test_unexpected_errors_are_one_line_exit_1_and_debug_raises(capsys, monkeypatch, tiny_vlm_dir, png):
    def broken(model):
        raise RuntimeError("the disk\nis on fire")

    monkeypatch.setattr(cli, "load_model", broken)
    argv = ["chat", "--model", tiny_vlm_dir, "--image", str(png), "Q?"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "vlm-chat chat: error: RuntimeError: the disk is on fire (--debug shows the traceback)\n"
    )
    with pytest.raises(RuntimeError, match="the disk"):
        main([*argv, "--debug"])


def test_flag_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--max-new-tokens", "0", "Q?"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "vlm-chat chat: error: argument --max-new-tokens: expected a positive integer, got 0 "
        "(usage: vlm-chat chat --help)\n"
    )


def test_installed_command_in_a_pipe(tiny_vlm_dir, chat, png, tmp_path):
    """The real process, stderr a pipe: the answer on stdout and nothing at all on stderr; a bad path is one line."""
    cmd = [sys.executable, "-m", "vlm_chat.cli", "chat", "--model", tiny_vlm_dir, "--image", "-", "What color?",
           "--max-new-tokens", "6"]
    proc = subprocess.run(cmd, input=png.read_bytes(), capture_output=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.stderr.decode() == ""
    assert (proc.returncode, proc.stdout.decode()) == (0, chat.generate(str(png), "What color?", **GEN) + "\n")

    cmd = [sys.executable, "-m", "vlm_chat.cli", "chat", "--model", tiny_vlm_dir, "--image", "nope.png", "Q?"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "vlm-chat chat: error: image file not found: nope.png\n"


def test_training_logs_off_a_terminal_have_no_bars_or_library_warnings(tmp_path):
    """What train/*.py and the quickstart do first (``setup_logging``), then the engine's loop, stderr a pipe."""
    script = textwrap.dedent(f"""
        import logging, warnings
        import torch
        from vlm_chat.console import setup_logging
        setup_logging(logging.INFO)
        from transformers.utils import logging as hf_logging
        from vlm_chat.training.args import TrainConfig
        from vlm_chat.training.engine import train
        warnings.warn("a library UserWarning")
        hf_logging.get_logger("transformers").warning("a transformers warning")
        data = [(torch.randn(3), torch.randn(1)) for _ in range(8)]
        collate = lambda rows: {{"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}}
        loss = lambda m, b: (((m(b["x"]) - b["y"]) ** 2).mean(), {{}})
        cfg = TrainConfig(output_dir={str(tmp_path / "run")!r}, max_steps=4, per_device_train_batch_size=2,
                          save_steps=0, logging_steps=1, report_to="none")
        train(torch.nn.Linear(3, 1), data, collate, loss, cfg)
        logging.getLogger("vlm_chat").info("our own line")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "INFO vlm_chat: our own line" in proc.stderr
    assert "training 4 steps" in proc.stderr  # the engine's own log lines stay
    for noise in ("\r", "it/s", "UserWarning", "a transformers warning"):
        assert noise not in proc.stderr
