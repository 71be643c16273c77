"""Shared inputs of the reliability tests: the odd pictures, the answer helpers and the checkpoint damage catalogue.

Imported by the test files next to it (and by their conftest.py, which builds the module's fixtures from them).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from vlm_chat import VLMChat

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is in the picture?"
N_TOKENS = 4
GEN = {"max_new_tokens": N_TOKENS, "min_new_tokens": N_TOKENS}  # fixed length: compare real tokens
ENTRIES = ("generate", "caption", "stream")

BG, RED, BLUE, HIDDEN = (204, 204, 204), (255, 0, 0), (0, 0, 255), (0, 255, 0)


def scene(background=BG, size=(64, 48)) -> Image.Image:
    """An asymmetric, non-square scene (a red disc top-left, a blue square bottom-right) in web-safe colours."""
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 28, 28), fill=RED)
    draw.rectangle((38, 22, 60, 44), fill=BLUE)
    return img


def gray() -> np.ndarray:
    """A 48x64 8-bit grayscale picture using the full 0..255 range (a gradient with a dark disc)."""
    arr = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    yy, xx = np.mgrid[:48, :64]
    arr[(yy - 24) ** 2 + (xx - 40) ** 2 < 100] = 30
    return arr


def disc_mask() -> np.ndarray:
    yy, xx = np.mgrid[:48, :64]
    return (yy - 20) ** 2 + (xx - 24) ** 2 < 200


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels but holds a few bytes of data: a decompression bomb's header.

    Whoever decodes it before checking the size pays for width x height pixels; a loader that checks the header first
    refuses it in microseconds.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


GIF_SECOND_FRAME = dict(background=(0, 0, 0))

_answers: dict[tuple, str] = {}


def ask(chat: VLMChat, entry: str, image, prompt: str = QUESTION) -> str:
    """One answer through a public entry point (greedy, fixed length)."""
    if entry == "generate":
        return chat.generate(image, prompt, **GEN)
    if entry == "caption":
        return chat.caption(image, **GEN)
    if entry == "stream":
        return "".join(chat.stream(image, prompt, **GEN)).strip()
    raise AssertionError(entry)


def reference_answer(chat: VLMChat, refs, entry: str, name: str) -> str:
    key = (id(chat), entry, name)
    if key not in _answers:
        _answers[key] = ask(chat, entry, refs[name])
    return _answers[key]



def damaged_copy(ckpt: Path, tmp_path: Path, damage) -> Path:
    target = tmp_path / "damaged"
    shutil.copytree(ckpt, target)
    damage(target)
    return target


def edit_config(update):
    def damage(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        update(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    return damage


def truncate(rel: str):
    return lambda d: (d / rel).write_bytes((d / rel).read_bytes()[:60])


def drop_key(rel: str):
    def damage(d: Path):
        state = load_file(str(d / rel))
        del state[sorted(state)[0]]
        save_file(state, str(d / rel))

    return damage


CHECKPOINT_DAMAGE = {
    # id: (damage, exception, message pattern); covered elsewhere: a missing directory, mapper.safetensors, an unknown
    # key and format_version 99 (tests/test_model.py::test_broken_checkpoints_are_refused).
    "no_config": (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json is missing"),
    "no_adapter_weights": (
        lambda d: (d / "adapter/adapter_model.safetensors").unlink(),
        FileNotFoundError,
        "missing adapter/adapter_model.safetensors",
    ),
    "no_adapter_config": (
        lambda d: (d / "adapter/adapter_config.json").unlink(),
        FileNotFoundError,
        "missing adapter/adapter_config.json",
    ),
    "no_tokenizer_config": (
        lambda d: (d / "tokenizer_config.json").unlink(),
        FileNotFoundError,
        "missing tokenizer_config.json",
    ),
    "config_not_json": (lambda d: (d / "config.json").write_text("{oops"), ValueError, "config.json: not valid JSON"),
    "config_without_version": (edit_config(lambda c: c.pop("format_version")), ValueError, "format_version None"),
    "config_wrong_type": (
        edit_config(lambda c: c.update(num_image_tokens="16")),
        TypeError,
        "'num_image_tokens' must be int",
    ),
    "config_unknown_mapper": (
        edit_config(lambda c: c["mapper"].update(kind="resampler")),
        ValueError,
        "unknown mapper 'resampler'",
    ),
}

# Found by this catalogue and fixed in the core: each of these used to escape as OSError, SafetensorError or
# RuntimeError, which the CLI and the app do not catch (the user saw a traceback), or named no file.
CHECKPOINT_DAMAGE.update(
    {
        "no_vision_weights": (
            lambda d: (d / "vision/model.safetensors").unlink(),
            FileNotFoundError,
            "missing vision/model.safetensors",
        ),
        "no_vision_processor": (
            lambda d: (d / "vision/preprocessor_config.json").unlink(),
            FileNotFoundError,
            "missing vision/preprocessor_config.json",
        ),
        "no_tokenizer_json": (lambda d: (d / "tokenizer.json").unlink(), FileNotFoundError, "missing tokenizer.json"),
        "truncated_mapper": (
            truncate("mapper.safetensors"),
            ValueError,
            "mapper.safetensors is not a readable safetensors file",
        ),
        "truncated_adapter": (
            truncate("adapter/adapter_model.safetensors"),
            ValueError,
            "adapter/adapter_model.safetensors is not a readable safetensors file",
        ),
        "mapper_does_not_match_config": (
            edit_config(lambda c: c["mapper"].update(depth=3)),
            ValueError,
            "mapper.safetensors does not fit the mapper described in config.json",
        ),
    }
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_png(path: Path) -> Path:
    scene().save(path)
    return path

