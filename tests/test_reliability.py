"""Reliability: the bad-input catalogue, the security defaults, and the anchors' known failures as regression tests.

Every case here goes through a public entry point: ``VLMChat.generate`` / ``caption`` / ``stream`` /
``generate_batch`` / ``from_pretrained``, the ``vlm-chat`` command line (``vlm_chat.cli.main``), the data readers as
the training stages call them, or the Gradio app. ``docs/reliability.md`` lists every case and where it is tested,
including the unit tests that already cover parts (tests/test_images.py, test_prompting.py, test_model.py,
test_data.py, test_engine.py, test_app.py, test_cli.py).

"Must work" cases are checked against an independent reference: the answer for an odd input (an RGBA image, a 16-bit
PNG, an EXIF-rotated JPEG, ...) must equal the answer for the plain RGB image a viewer would show. The tiny random model
answers differently for different images (``test_reference_answers_tell_the_images_apart`` guards that), so an equal
answer means the model saw the same picture. Greedy decoding makes the answers deterministic.

Cases that found bugs in the core say so in their docstring (the bug was fixed; the test keeps it fixed). A case that
fails because of an unfixed bug is marked ``xfail(strict=True)`` with the bug in the reason, so fixing it turns the
mark into a failure that asks for its removal.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import socket
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from vlm_chat import VLMChat
from vlm_chat.cli import main as cli_main
from vlm_chat.prompting import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is in the picture?"
N_TOKENS = 4
GEN = {"max_new_tokens": N_TOKENS, "min_new_tokens": N_TOKENS}  # fixed length: compare real tokens
ENTRIES = ("generate", "caption", "stream")

# ---------------------------------------------------------------------------------------------------------- images
BG, RED, BLUE, HIDDEN = (204, 204, 204), (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _scene(background=BG, size=(64, 48)) -> Image.Image:
    """An asymmetric, non-square scene (a red disc top-left, a blue square bottom-right) in web-safe colours."""
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    draw.ellipse((4, 4, 28, 28), fill=RED)
    draw.rectangle((38, 22, 60, 44), fill=BLUE)
    return img


def _gray() -> np.ndarray:
    """A 48x64 8-bit grayscale picture using the full 0..255 range (a gradient with a dark disc)."""
    arr = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    yy, xx = np.mgrid[:48, :64]
    arr[(yy - 24) ** 2 + (xx - 40) ** 2 < 100] = 30
    return arr


def _disc_mask() -> np.ndarray:
    yy, xx = np.mgrid[:48, :64]
    return (yy - 20) ** 2 + (xx - 24) ** 2 < 200


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Odd and broken image files, written once per module."""
    d = tmp_path_factory.mktemp("reliability_images")
    out = {}
    out["png16"] = d / "gray16.png"
    Image.fromarray(_gray().astype(np.uint16) * 257).save(out["png16"])  # 16-bit PNG, full range
    out["tiff32"] = d / "gray32.tif"
    Image.fromarray(_gray().astype(np.int32) * 1000).save(out["tiff32"])  # 32-bit signed integer TIFF
    out["exif"] = d / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: "rotate 90 degrees clockwise to display"
    _scene(size=(64, 40)).save(out["exif"], quality=95, exif=exif)
    out["gif"] = d / "animated.gif"
    _scene().save(out["gif"], save_all=True, append_images=[_scene(**GIF_SECOND_FRAME)], duration=100, loop=0)
    out["unicode"] = d / "фото 图像 😀.png"  # spaces and non-ASCII, as user files are named
    _scene().save(out["unicode"])
    out["text"] = d / "notes.png"
    out["text"].write_text("this is a text file with an image name")
    out["truncated"] = d / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out["truncated"].write_bytes(_png(Image.fromarray(noise))[:-100])
    out["bomb"] = d / "bomb_81mp.png"
    out["bomb"].write_bytes(_png_header_only(9000, 9000))  # 81 MP: over our 64 MP cap, under PIL's own warning
    out["huge_bomb"] = d / "bomb_400mp.png"
    out["huge_bomb"].write_bytes(_png_header_only(20000, 20000))  # 400 MP: PIL's DecompressionBombError
    out["empty"] = d / "empty.png"
    out["empty"].write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def refs(files) -> dict[str, Image.Image]:
    """The plain RGB pictures a viewer shows for each odd input."""
    gray = _gray()
    on_white = gray.copy()
    on_white[~_disc_mask()] = 255
    with Image.open(files["exif"]) as jpeg:  # the JPEG's own pixels, EXIF not applied
        stored = jpeg.convert("RGB")
    return {
        "scene": _scene(),
        "scene_on_white": _scene(background=(255, 255, 255)),
        "gray": Image.fromarray(gray).convert("RGB"),
        "gray_disc_on_white": Image.fromarray(on_white).convert("RGB"),
        "solid_red": Image.new("RGB", (64, 64), RED),
        "exif_rotated": stored.transpose(Image.Transpose.ROTATE_270),  # what orientation 6 displays
        "exif_unrotated": stored,
        "gif_second_frame": _scene(**GIF_SECOND_FRAME),
    }


# ---------------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_clip_dir, tiny_llama_dir) -> Path:
    """A saved tiny VLM (CLIP + Llama-3-template LLM); the API and the CLI load the same directory."""
    path = tmp_path_factory.mktemp("reliability_ckpt") / "model"
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(ckpt) -> VLMChat:
    return VLMChat.from_pretrained(ckpt, device="cpu")


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


def test_reference_answers_tell_the_images_apart(chat, refs):
    """Guard: equal answers below mean "same picture" only if different pictures get different answers."""
    names = [
        "scene",
        "scene_on_white",
        "gray",
        "gray_disc_on_white",
        "solid_red",
        "exif_rotated",
        "exif_unrotated",
        "gif_second_frame",
    ]
    answers = [reference_answer(chat, refs, "generate", n) for n in names]
    assert len(set(answers)) == len(names), dict(zip(names, answers))


# ---------------------------------------------------------------------------------------------------------- must work


def _rgba(refs):
    rgba = _scene(background=HIDDEN).convert("RGBA")
    arr = np.asarray(rgba).copy()
    arr[(arr[..., :3] == HIDDEN).all(-1), 3] = 0  # the background is fully transparent; its colour must not show
    return Image.fromarray(arr, "RGBA")


def _la(refs):
    alpha = np.where(_disc_mask(), 255, 0).astype(np.uint8)
    return Image.merge("LA", [Image.fromarray(_gray()), Image.fromarray(alpha)])


def _p_transparent(refs):
    p = _scene(background=HIDDEN).convert("P", palette=Image.Palette.ADAPTIVE)
    index = p.getpixel((63, 0))
    p.info["transparency"] = index
    return p


MUST_WORK = {
    # id: (entry point, input builder(refs, files), reference picture)
    "rgba_transparent_background": ("generate", lambda r, f: _rgba(r), "scene_on_white"),
    "la_grayscale_with_alpha": ("caption", lambda r, f: _la(r), "gray_disc_on_white"),
    "p_palette": ("stream", lambda r, f: r["scene"].convert("P", palette=Image.Palette.ADAPTIVE), "scene"),
    "p_palette_with_transparency": ("generate", lambda r, f: _p_transparent(r), "scene_on_white"),
    "cmyk": ("generate", lambda r, f: r["scene"].convert("CMYK"), "scene"),
    "grayscale_L": ("stream", lambda r, f: Image.fromarray(_gray()), "gray"),
    "png_16bit_file": ("caption", lambda r, f: f["png16"], "gray"),
    "tiff_32bit_integer_file": ("generate", lambda r, f: f["tiff32"], "gray"),
    "one_pixel": ("generate", lambda r, f: Image.new("RGB", (1, 1), RED), "solid_red"),
    "exif_rotated_jpeg": ("generate", lambda r, f: f["exif"], "exif_rotated"),
    "animated_gif_first_frame": ("generate", lambda r, f: f["gif"], "scene"),
    "numpy_hwc_uint8": ("stream", lambda r, f: np.asarray(r["scene"]), "scene"),
    "numpy_hwc_float01": ("generate", lambda r, f: np.asarray(r["scene"], dtype=np.float32) / 255.0, "scene"),
    "numpy_chw_uint8": ("caption", lambda r, f: np.moveaxis(np.asarray(r["scene"]), -1, 0).copy(), "scene"),
    "numpy_uint16": ("generate", lambda r, f: _gray().astype(np.uint16) * 257, "gray"),
    "encoded_png_bytes": ("generate", lambda r, f: _png(r["scene"]), "scene"),
    "unicode_path_with_spaces": ("caption", lambda r, f: str(f["unicode"]), "scene"),
    "pathlib_path": ("stream", lambda r, f: f["unicode"], "scene"),
}


@pytest.mark.parametrize("case", list(MUST_WORK))
def test_must_work_image_kinds(chat, refs, files, case):
    """Each odd image kind is answered exactly as the plain RGB picture a viewer would show."""
    entry, build, reference = MUST_WORK[case]
    assert ask(chat, entry, build(refs, files)) == reference_answer(chat, refs, entry, reference)


def test_exif_rotation_and_gif_frame_matter(chat, refs, files):
    """The two cases above would pass vacuously if rotation or frame choice changed nothing: they do change it."""
    assert ask(chat, "generate", files["exif"]) != reference_answer(chat, refs, "generate", "exif_unrotated")
    assert ask(chat, "generate", files["gif"]) != reference_answer(chat, refs, "generate", "gif_second_frame")


@pytest.mark.parametrize("size", [(2000, 1), (1, 2000), (900, 3)])
def test_must_work_extreme_aspect_ratios(chat, size):
    for entry in ENTRIES:
        answer = ask(chat, entry, Image.new("RGB", size, RED))
        assert isinstance(answer, str) and answer


def test_extreme_aspect_ratio_is_preprocessed_in_bounded_memory(chat):
    """A tower's processor scales an image's SHORT side to its input size, so memory grows with the aspect ratio: a
    20000x1 PNG (a few bytes) took ~120 MB here and would take ~27 GB with CLIP-336, a denial of service through the
    app. Found by this catalogue; fixed by bounding the shape before the processor (vlm_chat.images.bound_aspect)."""
    image = Image.new("RGB", (20000, 1), RED)
    tracemalloc.start()
    try:
        chat.generate(image, QUESTION, max_new_tokens=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"preprocessing a 20,000-pixel image peaked at {peak / 1e6:.0f} MB"


def test_numpy_of_a_32bit_image_matches_the_image(chat, refs, files):
    """np.asarray() of a 32-bit TIFF is the same picture as the file (it was scaled by int32's full range, a flat grey
    image, before this catalogue found it)."""
    arr = np.asarray(Image.open(files["tiff32"]))
    assert arr.dtype == np.int32
    assert ask(chat, "generate", arr) == reference_answer(chat, refs, "generate", "gray")


def test_unicode_and_emoji_prompts(chat, refs):
    prompt = "Что это? 这是什么颜色？ 🎨🟥 Ünïcödé — «quotes» \u200d\U0001f469\u200d\U0001f4bb"
    answer = chat.generate(refs["scene"], prompt, **GEN)
    assert answer and "".join(chat.stream(refs["scene"], prompt, **GEN)).strip() == answer
    # The prompt reaches the model intact (no mojibake, no dropped code points).
    ids = chat.processor.encode_prompt(prompt, has_image=True).input_ids
    assert prompt in chat.processor.tokenizer.decode(ids)


def test_prompt_longer_than_the_context_keeps_every_image_token(tiny_clip_dir, tiny_llama_dir, refs):
    """The text is cut from the start; the visual tokens never are (and the image still decides the answer)."""
    small = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), lm_config={"max_length": 96}, device="cpu")
    long_prompt = "Please look very carefully. " * 400 + QUESTION
    history = [{"role": "user", "content": "Describe it. " * 50}, {"role": "assistant", "content": "Shapes. " * 50}]
    answers = {}
    for name in ("scene", "gray"):
        answers[name] = small.generate(refs[name], long_prompt, history=history, **GEN)
        assert "".join(small.stream(refs[name], long_prompt, history=history, **GEN)).strip() == answers[name]
    assert answers["scene"] != answers["gray"]
    enc = small.processor.encode_prompt(long_prompt, history, has_image=True, reserve=N_TOKENS)
    assert len(enc.input_ids) <= 96 - N_TOKENS
    assert enc.input_ids.count(small.processor.image_token_id) == small.config.num_image_tokens
    assert QUESTION in small.processor.tokenizer.decode(enc.input_ids)  # the end of the prompt survives


def test_literal_image_marker_places_the_image(chat, refs):
    at_start = chat.generate(refs["scene"], QUESTION, **GEN)
    assert chat.generate(refs["scene"], f"<image>\n{QUESTION}", **GEN) == at_start  # the default place, spelled out
    elsewhere = chat.generate(refs["scene"], f"{QUESTION} Here it is: <image>", **GEN)
    assert elsewhere and elsewhere != at_start  # the marker moved the image
    assert chat.generate(refs["scene"], "<image>", **GEN)  # an image-only turn is a valid prompt


def test_text_only_turns(chat):
    text = chat.generate(None, "Hello! Who are you?", **GEN)
    assert text and "".join(chat.stream(None, "Hello! Who are you?", **GEN)).strip() == text
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert chat.generate(None, "How are you?", history=history, **GEN)


def test_multi_turn_with_the_marker_in_an_earlier_turn(chat, refs):
    history = [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": "Shapes."}]
    same = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Shapes."}]
    assert chat.generate(refs["scene"], "And the colours?", history=history, **GEN) == chat.generate(
        refs["scene"], "And the colours?", history=same, **GEN
    )


def test_caption_is_the_prompt_less_call(chat, refs):
    short, detailed = chat.caption(refs["scene"], **GEN), chat.caption(refs["scene"], detailed=True, **GEN)
    assert short and detailed and short != detailed


# ---------------------------------------------------------------------------------------------------------- refused

REFUSE_IMAGES = {
    # id: (input builder(files), exception, message pattern)
    "missing_file": (lambda f: f["text"].parent / "no_such_image.png", FileNotFoundError, r"no_such_image\.png"),
    "text_file_named_png": (lambda f: f["text"], ValueError, r"notes\.png: not a readable image"),
    "truncated_png": (lambda f: f["truncated"], ValueError, r"truncated\.png: image data is corrupt or truncated"),
    "empty_file": (lambda f: f["empty"], ValueError, r"empty\.png: not a readable image"),
    "undecodable_bytes": (lambda f: b"\x89PNG not really", ValueError, "image bytes: not a readable image"),
    "empty_bytes": (lambda f: b"", ValueError, "image bytes are empty"),
    "array_rank_1": (lambda f: np.zeros(12, np.uint8), ValueError, r"rank 1"),
    "array_rank_4": (lambda f: np.zeros((1, 4, 4, 3), np.uint8), ValueError, r"rank 4"),
    "array_zero_size": (lambda f: np.zeros((0, 5, 3), np.uint8), ValueError, "zero size"),
    "array_5_channels": (lambda f: np.zeros((8, 8, 5), np.uint8), ValueError, r"HxWx3 or HxWx4"),
    "float_array_outside_0_1": (lambda f: np.full((4, 4, 3), 255.0), ValueError, r"\[0, 1\]"),
    "float_array_with_nan": (lambda f: np.full((4, 4, 3), np.nan, np.float32), ValueError, "NaN or inf"),
    "bomb_over_our_cap": (lambda f: f["bomb"], ValueError, r"9000x9000 = 81,000,000 pixels, over the limit"),
    "bomb_over_pil_cap": (lambda f: f["huge_bomb"], ValueError, "decompression bomb"),
    "unsupported_type_int": (lambda f: 12, TypeError, "must be a PIL.Image, a path, bytes or a numpy array"),
    "unsupported_type_list": (lambda f: [[0, 0, 0]], TypeError, "got builtins.list"),
    "torch_tensor": (lambda f: torch.zeros(3, 8, 8), TypeError, "got torch.Tensor"),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(REFUSE_IMAGES))
def test_bad_images_are_refused_naming_the_problem(chat, files, case, entry):
    build, exc, pattern = REFUSE_IMAGES[case]
    with pytest.raises(exc, match=pattern):
        ask(chat, entry, build(files))


BAD_PROMPTS = {
    "empty": ("", ValueError, "prompt is empty"),
    "whitespace_only": (" \n\t\u3000 ", ValueError, "prompt is empty"),
    "none": (None, TypeError, "prompt must be a string, got NoneType"),
    "bytes": (b"What?", TypeError, "prompt must be a string, got bytes"),
    "two_markers_one_image": ("<image> and <image>?", ValueError, "2 '<image>' markers for one image"),
}


@pytest.mark.parametrize("entry", ["generate", "stream"])
@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompts_are_refused(chat, refs, case, entry):
    prompt, exc, pattern = BAD_PROMPTS[case]
    with pytest.raises(exc, match=pattern):
        ask(chat, entry, refs["scene"], prompt)


def test_markers_must_match_the_images(chat, refs):
    history = [{"role": "user", "content": "<image> first"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="2 '<image>' marker"):  # one in the history, one in the prompt
        chat.generate(refs["scene"], "<image> again", history=history, **GEN)
    with pytest.raises(ValueError, match="1 '<image>' marker.*0 image"):  # a marker in a text-only turn
        chat.generate(None, "What is <image>?", **GEN)


def test_caption_needs_an_image(chat):
    with pytest.raises(ValueError, match="caption\\(\\) needs an image"):
        chat.caption(None)


def test_batches_must_be_consistent(chat, refs):
    with pytest.raises(ValueError, match="got 2 images for 1 prompts"):
        chat.generate_batch([refs["scene"], refs["gray"]], [QUESTION])
    with pytest.raises(ValueError, match="all images or all text-only"):
        chat.generate_batch([refs["scene"], None], [QUESTION, QUESTION])


def test_out_of_range_generation_settings_are_refused(chat, refs):
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.generate(refs["scene"], QUESTION, max_new_tokens=0)


def test_misspelled_generation_keyword_is_refused(chat, refs):
    """transformers' GenerationConfig keeps unknown keys and ignores them: max_new_token=2 generated 64 tokens."""
    with pytest.raises(
        TypeError, match="unknown generation keyword.*'max_new_token' \\(did you mean 'max_new_tokens'\\?\\)"
    ):
        chat.generate(refs["scene"], QUESTION, max_new_token=2)


@pytest.mark.parametrize(
    "history",
    [[{"role": "user"}], ["hello"], "not a list", [{"role": "bot", "content": "x"}]],
    ids=["no_content", "strings", "not_a_list", "unknown_role"],
)
def test_malformed_history_is_refused_naming_the_turn(chat, refs, history):
    """A KeyError('content') or "string indices must be integers" named neither the history nor the turn."""
    with pytest.raises((ValueError, TypeError), match=r"history\[0\]"):
        chat.generate(refs["scene"], QUESTION, history=history, **GEN)


def test_unknown_mapper_is_refused_listing_the_valid_ones(tiny_clip_dir, tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown mapper 'resampler'; valid mappers: mlp, perceiver, qformer"):
        VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), mapper="resampler", device="cpu")


# ---------------------------------------------------------------------------------------------------------- checkpoints


def _damaged_copy(ckpt: Path, tmp_path: Path, damage) -> Path:
    target = tmp_path / "damaged"
    shutil.copytree(ckpt, target)
    damage(target)
    return target


def _edit_config(update):
    def damage(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        update(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    return damage


def _truncate(rel: str):
    return lambda d: (d / rel).write_bytes((d / rel).read_bytes()[:60])


def _drop_key(rel: str):
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
    "config_without_version": (_edit_config(lambda c: c.pop("format_version")), ValueError, "format_version None"),
    "config_wrong_type": (
        _edit_config(lambda c: c.update(num_image_tokens="16")),
        TypeError,
        "'num_image_tokens' must be int",
    ),
    "config_unknown_mapper": (
        _edit_config(lambda c: c["mapper"].update(kind="resampler")),
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
            _truncate("mapper.safetensors"),
            ValueError,
            "mapper.safetensors is not a readable safetensors file",
        ),
        "truncated_adapter": (
            _truncate("adapter/adapter_model.safetensors"),
            ValueError,
            "adapter/adapter_model.safetensors is not a readable safetensors file",
        ),
        "mapper_does_not_match_config": (
            _edit_config(lambda c: c["mapper"].update(depth=3)),
            ValueError,
            "mapper.safetensors does not fit the mapper described in config.json",
        ),
    }
)


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_problem(ckpt, tmp_path, case):
    damage, exc, pattern = CHECKPOINT_DAMAGE[case]
    with pytest.raises(exc, match=pattern):
        VLMChat.from_pretrained(_damaged_copy(ckpt, tmp_path, damage), device="cpu")


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_odd_images_and_unicode_questions(capsys, ckpt, chat, files):
    question = "Что это? 🎨 这是什么"
    code, out, err = _cli(capsys, "chat", "--model", ckpt, "--image", files["png16"], question, "--max-new-tokens", 4)
    assert code == 0, err
    assert out == chat.generate(files["png16"], question, max_new_tokens=4, do_sample=False) + "\n"
    code, out, err = _cli(capsys, "caption", files["exif"], "--model", ckpt, "--max-new-tokens", 4)
    assert code == 0 and out == chat.caption(files["exif"], max_new_tokens=4, do_sample=False) + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--image", "__truncated__", "What?"], "truncated.png: image data is corrupt or truncated"),
        (["caption", "__bomb__"], "over the limit"),
        (["chat", "--image", "__png16__", "<image> and <image>"], "2 '<image>' markers"),
        (["chat", "What is <image>?"], "0 image(s) were given"),
        (["chat", "--model", "__v99__", "Hi"], "format_version 99 is not supported"),
    ],
    ids=["truncated_image", "bomb", "two_markers", "marker_without_image", "checkpoint_version_99"],
)
def test_cli_bad_input_is_one_clear_line(capsys, ckpt, files, tmp_path, argv, message):
    v99 = _damaged_copy(ckpt, tmp_path, _edit_config(lambda c: c.update(format_version=99)))
    swap = {"__truncated__": files["truncated"], "__bomb__": files["bomb"], "__png16__": files["png16"], "__v99__": v99}
    argv = [swap.get(a, a) for a in argv]
    if "--model" not in argv:
        argv += ["--model", ckpt]
    code, out, err = _cli(capsys, *argv)
    assert (code, out) == (2, "")
    # Loading a model may print library progress bars on stderr; our own report is exactly one line.
    ours = [line for line in err.splitlines() if line.startswith("vlm-chat")]
    assert len(ours) == 1 and ours[0].startswith(f"vlm-chat {argv[0]}: error:") and message in ours[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["no_vision_weights", "truncated_mapper", "mapper_does_not_match_config"])
def test_cli_damaged_checkpoint_is_one_clear_line(capsys, ckpt, tmp_path, files, case):
    damage, _, message = CHECKPOINT_DAMAGE[case]
    damaged = _damaged_copy(ckpt, tmp_path, damage)
    code, out, err = _cli(capsys, "caption", files["png16"], "--model", damaged)
    ours = [line for line in err.splitlines() if line.startswith("vlm-chat")]
    assert (code, out) == (2, "") and "Traceback" not in err
    assert len(ours) == 1 and str(damaged) in ours[0] and message in ours[0]


# ---------------------------------------------------------------------------------------------------------- data readers


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_reader_refuses_a_decompression_bomb_row_without_decoding_it(tmp_path, files):
    from vlm_chat.data import DataError, load_captions

    folder = tmp_path / "img"
    folder.mkdir()
    shutil.copy(files["bomb"], folder / "bomb.png")
    _make_png(folder / "ok.png")
    path = _write_jsonl(
        tmp_path / "caps.jsonl", [{"image": "ok.png", "caption": "a scene"}, {"image": "bomb.png", "caption": "boom"}]
    )
    with pytest.raises(DataError, match=r"caps\.jsonl, row 1 .*9000x9000 pixels.*\[unreadable_image\]"):
        load_captions(path, folder)
    ds, report = load_captions(path, folder, skip_bad_rows=True)
    assert len(ds) == 1 and report.counts == {"unreadable_image": 1}


def test_data_reader_follows_a_symlinked_image_folder(tmp_path):
    """A symlinked image folder is where its images live: its own images are inside it, not escapes."""
    from vlm_chat.data import load_conversations

    real = tmp_path / "real_images"
    real.mkdir()
    _make_png(real / "a.png")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    ds, report = load_conversations(_write_jsonl(tmp_path / "c.jsonl", [row]), tmp_path / "link")
    assert len(ds) == 1 and report.skipped == 0 and ds[0]["image"] == str((real / "a.png").resolve())


def _make_png(path: Path) -> Path:
    _scene().save(path)
    return path


# ---------------------------------------------------------------------------------------------------------- security


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
    assert httpx.post(upload, files={"files": ("ok.png", _png(_scene()))}).status_code == 200


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


# Unsafe deserialisation and code execution, as they would be written in this code base.
_BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Places in ``source`` that could read a pickle or run downloaded code.

    Flags: importing a pickle-family module; ``torch.load`` without ``weights_only=True``; ``weights_only=False``;
    ``np.load(allow_pickle=True)``; ``use_safetensors=False``; a literal ``trust_remote_code=True``.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: import {n}" for n in names if n.split(".")[0] in _BANNED_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if func.endswith(("torch.load", "serialization.load")):
            flag = kw.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: {func}() without weights_only=True")
        for name, bad in (
            ("weights_only", False),
            ("allow_pickle", True),
            ("use_safetensors", False),
            ("trust_remote_code", True),
        ):
            value = kw.get(name)
            if isinstance(value, ast.Constant) and value.value is bad:
                found.append(f"{where}: {func}({name}={bad})")
    return found


def test_unsafe_call_scanner_catches_what_it_should():
    bad = (
        "import torch, pickle\nfrom dill import loads\nimport numpy as np\n"
        "torch.load('x.bin')\ntorch.load('x.bin', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=False)\n"
    )
    assert len(unsafe_calls(bad)) == 8  # torch.load(..., weights_only=False) is flagged twice
    assert (
        unsafe_calls("import torch\ntorch.load('x', weights_only=True)\nA.from_pretrained(p, trust_remote_code=flag)")
        == []
    )


def test_no_unguarded_pickle_or_remote_code_in_the_package():
    """Fails as soon as someone adds an unguarded torch.load, a pickle import, or hard-codes trust_remote_code=True."""
    sources = sorted((REPO / "vlm_chat").rglob("*.py")) + sorted((REPO / "train").glob("*.py")) + [REPO / "app.py"]
    found = [hit for path in sources for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_loading_saving_and_chatting_read_no_pickle(ckpt, tmp_path, monkeypatch, refs):
    """from_pretrained, generate, save_pretrained, export and reloading the export never unpickle anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    class RefusingUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    loaded = VLMChat.from_pretrained(ckpt, device="cpu")
    loaded.generate(refs["scene"], QUESTION, max_new_tokens=2)
    loaded.save_pretrained(tmp_path / "again")
    loaded.export(tmp_path / "merged")
    VLMChat.from_pretrained(tmp_path / "merged", device="cpu").generate(refs["scene"], QUESTION, max_new_tokens=2)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the shape of every pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_malicious_pickle_never_runs(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    def plant(d: Path):
        (d / "vision/model.safetensors").unlink()
        torch.save({"vision_model.embeddings.patch_embedding.weight": _Payload(marker)}, d / "vision/pytorch_model.bin")

    damaged = _damaged_copy(ckpt, tmp_path, plant)
    with pytest.raises(Exception):  # noqa: B017 - refused one way or another; what matters is the marker below
        VLMChat.from_pretrained(damaged, device="cpu")
    assert not marker.exists()


def _to_bin(weights: Path) -> None:
    """Replace a safetensors file by the same tensors as a (harmless) pytorch_model.bin pickle."""
    torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
    weights.unlink()


def test_weights_that_are_not_safetensors_are_refused_unread(
    ckpt, tmp_path, tiny_clip_dir, tiny_llama_dir, monkeypatch
):
    """Only safetensors are read: weights present only as pytorch_model.bin are refused without calling torch.load
    (they used to be read with torch.load(weights_only=True): no code execution, but a pickle all the same)."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    damaged = _damaged_copy(ckpt, tmp_path, lambda d: _to_bin(d / "vision/model.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing vision/model.safetensors"):
        VLMChat.from_pretrained(damaged, device="cpu")
    for name, source in (("vision_bin", tiny_clip_dir), ("lm_bin", tiny_llama_dir)):
        shutil.copytree(source, tmp_path / name)
        _to_bin(tmp_path / name / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        VLMChat.from_components(str(tmp_path / "vision_bin"), str(tiny_llama_dir), device="cpu")
    with pytest.raises(OSError, match="model.safetensors"):
        VLMChat.from_components(str(tiny_clip_dir), str(tmp_path / "lm_bin"), device="cpu")


def test_trust_remote_code_is_off_unless_asked(tmp_path, tiny_clip_dir, tiny_llama_dir, monkeypatch):
    """A checkpoint that ships code (``auto_map``) is loaded with the built-in classes; its code never runs."""
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "remote_code_ran"
    code = f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n"
    lm, vision = tmp_path / "lm", tmp_path / "vision"
    shutil.copytree(tiny_llama_dir, lm)
    shutil.copytree(tiny_clip_dir, vision)
    for d, files_and_maps in (
        (
            lm,
            {
                "config.json": {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"},
                "tokenizer_config.json": {"AutoTokenizer": ["evil.Evil", None]},
            },
        ),
        (
            vision,
            {
                "config.json": {"AutoConfig": "evil.Evil"},
                "preprocessor_config.json": {"AutoImageProcessor": "evil.Evil"},
            },
        ),
    ):
        (d / "evil.py").write_text(code)
        for name, auto_map in files_and_maps.items():
            cfg = json.loads((d / name).read_text())
            cfg["auto_map"] = auto_map
            (d / name).write_text(json.dumps(cfg))
    calls = []
    original = dynamic.get_class_from_dynamic_module
    for module in list(sys.modules.values()):  # every auto class imported the loader by name
        if getattr(module, "get_class_from_dynamic_module", None) is original:
            monkeypatch.setattr(
                module, "get_class_from_dynamic_module", lambda *a, **k: calls.append(a) or original(*a, **k)
            )
    built = VLMChat.from_components(str(vision), str(lm), device="cpu")
    assert built.config.lm.trust_remote_code is False
    assert built.generate(None, "Hi", max_new_tokens=2) is not None
    assert calls == [] and not marker.exists()


def test_dataset_image_paths_cannot_leave_their_folder_in_any_stage(tmp_path, monkeypatch):
    """Through the stages' own loader (pack_by_image included): escapes are bad rows, never opened.

    tests/test_data.py checks each reader's escape rules (``..``, absolute, symlink) in detail.
    """
    from vlm_chat import data
    from vlm_chat.data import DataError
    from vlm_chat.training.stages import DataArgs, load_rows

    folder = tmp_path / "images"
    folder.mkdir()
    _make_png(folder / "ok.png")
    secret = _make_png(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(secret)
    escapes = ["../secret.png", str(secret), "link.png", "./../images/../secret.png"]
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    rows = {
        "instruct": [{"image": p, "conversations": conv} for p in ["ok.png", *escapes]],
        "pretrain": [{"image": p, "caption": "a scene"} for p in ["ok.png", *escapes]],
        "dpo": [{"images": [p], "prompt": "<image>\nQ", "chosen": "A", "rejected": "B"} for p in ["ok.png", *escapes]],
    }
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        data.Image, "open", lambda fp, *a, **k: opened.append(Path(fp).resolve()) or real_open(fp, *a, **k)
    )
    for stage, stage_rows in rows.items():
        args = DataArgs(train_file=str(_write_jsonl(tmp_path / f"{stage}.jsonl", stage_rows)), image_folder=str(folder))
        kept = load_rows(stage, args, skip_bad_rows=True)
        assert [Path(r["image"]).name for r in kept] == ["ok.png"], stage
        with pytest.raises(DataError, match=r"row 1 .*outside the image folder.*\[path_escape\]"):
            load_rows(stage, args, skip_bad_rows=False)
    assert secret.resolve() not in opened and opened


# ---------------------------------------------------------------------------------------------------------- anchors

VICUNA_V1 = (  # LLaVA-1.5's "v1" conversation (Vicuna), written as a chat template
    "{{ 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def _llava_v1_label_length(tokenizer, text: str, sep: str, sep2: str) -> int:
    """LLaVA's preprocess_v1 bookkeeping: the token count it believes ``text`` has, summed round by round.

    It splits the rendered conversation at ``sep2`` (``</s>``), tokenizes each round on its own and assumes the
    per-round lengths add up to the whole; when they do not, it masks the entire sample ("tokenization mismatch: X vs.
    Y (ignored)" and a loss of 0.0 in LLaVA #661, #1166, #1706).
    """
    cur_len = 1  # LLaVA skips one BOS token
    for rou in text.split(sep2):
        if rou == "":
            break
        cur_len += len(tokenizer(rou).input_ids)
    return cur_len


def test_anchor_label_masks_with_non_default_templates(tokenizer_factory):
    """LLaVA #661 / #1166 / #1706 ("tokenization mismatch", loss 0.0 on other LLMs' templates).

    On a Vicuna-v1 template with a BPE tokenizer, LLaVA's round-by-round length bookkeeping disagrees with the real
    tokenization, so LLaVA would have dropped this sample's labels. Ours come from the template's own rendering and
    decode to exactly each assistant answer, end-of-turn token included.
    """
    from tokenizers import AddedToken
    from transformers import CLIPImageProcessor

    from vlm_chat.prompting import VLMProcessor

    tok = tokenizer_factory("llama2")  # real SmolLM2 BPE vocabulary with <s> </s> as BOS/EOS
    tok.chat_template = VICUNA_V1
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    proc = VLMProcessor(tok, CLIPImageProcessor(), "<image>", 5, 512)
    answers = ["A red circle.", "There are 2 shapes: a red circle and a blue square.", "Yes."]
    messages = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "How many shapes?"},
        {"role": "assistant", "content": answers[1]},
        {"role": "user", "content": "Is one red?"},
        {"role": "assistant", "content": answers[2]},
    ]
    text = proc.render(messages, add_generation_prompt=False)
    total = len(tok(text, add_special_tokens=False).input_ids)
    assert _llava_v1_label_length(tok, text, " ASSISTANT: ", "</s>") != total  # LLaVA would mask the whole sample

    enc = proc.encode_conversation(messages, num_images=1)
    runs, run = [], []
    for label in enc.labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            runs, run = (runs + [run] if run else runs), []
        else:
            run.append(label)
    assert [tok.decode(r[:-1]).strip() for r in runs] == answers
    assert all(r[-1] == tok.convert_tokens_to_ids("</s>") for r in runs)  # each answer learns to stop


def test_anchor_truncation_never_leaves_image_tokens_without_features(tiny_clip_dir, tiny_llama_dir, tmp_path):
    """transformers #36002 / TRL PR #5023: max_length cut part of the image placeholders while every image feature
    was kept ("Image features and image tokens do not match") and training crashed mid-run.

    Through the training collator: the sample whose image block would be cut is skipped whole; the batch that reaches
    the model has exactly N_vis image tokens per image and one feature block per image, and the forward pass runs.
    """
    from vlm_chat.training.stages import Collator, FeatureCache

    max_length = 48
    small = VLMChat.from_components(
        str(tiny_clip_dir), str(tiny_llama_dir), lm_config={"max_length": max_length}, device="cpu"
    )
    n_vis = small.config.num_image_tokens
    image = str(_make_png(tmp_path / "scene.png"))
    short = [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}]
    filler = "word " * 30
    late = [{"role": "user", "content": f"{filler}<image>\nColour?"}, {"role": "assistant", "content": "Red."}]
    # Precondition: untruncated, the late sample's image block straddles max_length.
    full = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").processor
    ids = full.encode_conversation(late, num_images=1).input_ids
    positions = [i for i, t in enumerate(ids) if t == full.image_token_id]
    assert positions[0] < max_length <= positions[-1]

    collate = Collator(small, "instruct", FeatureCache(small, enabled=True))
    batch = collate([{"image": image, "messages": short}, {"image": image, "messages": late}])
    image_tokens = (batch["input_ids"] == small.processor.image_token_id).sum(-1)
    assert image_tokens.tolist() == [n_vis] and batch["image_features"].shape[0] == 1
    out = small.model(**batch)
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    with pytest.raises(ValueError, match="every sample of a batch was skipped.*raise max_length"):
        collate([{"image": image, "messages": late}])


def _nudge(chat: VLMChat, seed: int = 0) -> None:
    """Give LoRA and the mapper non-trivial values, as training would (a fresh LoRA B is all zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            if "lora_B" in name or name.startswith("mapper."):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_anchor_lora_checkpoint_loads_and_merges_without_size_mismatch(tiny_clip_dir, tiny_smollm2_dir, tmp_path, refs):
    """LLaVA #462 / #744: "size mismatch for ...embed_tokens.weight" when loading or merging a LoRA checkpoint whose
    tokenizer gained tokens. Our adapter stores no embedding rows, so it loads with plain PEFT onto the base model
    resized to the checkpoint's tokenizer, and merging there gives exactly the weights our export wrote.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    _nudge(chat)
    chat.save_pretrained(tmp_path / "ckpt")
    chat.export(tmp_path / "merged")
    saved = load_file(str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"))
    assert saved and not [k for k in saved if "embed_tokens" in k or "lm_head" in k]

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(tiny_smollm2_dir)
    assert base.get_input_embeddings().weight.shape[0] < len(tokenizer)  # the image token was added
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    merged = PeftModel.from_pretrained(base, tmp_path / "ckpt" / "adapter").merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "lm")
    ours, theirs = exported.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    new_row = len(tokenizer) - 1  # the image token: never read (visual tokens replace it), zero in ours
    for key, value in ours.items():
        if "embed_tokens" in key or "lm_head" in key:
            assert value.shape == theirs[key].shape, key
            value, other = value[:new_row], theirs[key][:new_row]
        else:
            other = theirs[key]
        torch.testing.assert_close(value, other, msg=key)
    again = VLMChat.from_pretrained(tmp_path / "merged", device="cpu")
    assert again.generate(refs["scene"], QUESTION, **GEN) == chat.generate(refs["scene"], QUESTION, **GEN)


def test_anchor_reloaded_weights_are_the_saved_weights(tiny_clip_dir, tiny_smollm2_dir, tmp_path, refs):
    """nanoVLM PR #15: garbage tokens after reloading saved weights (tied embeddings / tensors lost in serialisation).

    On SmolLM2's architecture (tied input/output embeddings) with trained-looking LoRA and mapper weights, every
    tensor of the reloaded model equals the saved one, the embeddings stay tied, and the answers are identical.
    """
    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    _nudge(chat, seed=1)
    chat.save_pretrained(tmp_path / "ckpt")
    again = VLMChat.from_pretrained(tmp_path / "ckpt", device="cpu")
    before, after = chat.model.state_dict(), again.model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    causal = again.model.causal_lm
    assert causal.get_output_embeddings().weight.data_ptr() == causal.get_input_embeddings().weight.data_ptr()
    for image in (refs["scene"], refs["gray"]):
        assert again.generate(image, QUESTION, **GEN) == chat.generate(image, QUESTION, **GEN)


def test_anchor_adapter_with_missing_weights_is_refused(ckpt, tmp_path):
    """nanoVLM PR #15, the other way to reload garbage: PEFT only warns ("Found missing adapter keys") when an adapter
    file lacks LoRA weights and keeps their fresh init, so the reloaded model silently differs from the saved one.
    Found by this catalogue; now refused."""
    damaged = _damaged_copy(ckpt, tmp_path, _drop_key("adapter/adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors lacks 1 LoRA weight"):
        VLMChat.from_pretrained(damaged, device="cpu")


def test_anchor_batched_generation_pads_left_whatever_the_tokenizer_says(chat, refs):
    """transformers #32268: batched generation with a right-padding tokenizer generates after the pad tokens and
    gives wrong text for the shorter prompts. Many LLM tokenizers ship with padding_side="right"; generate_batch
    must left-pad anyway and match one-at-a-time answers for prompts of very different lengths.
    """
    tokenizer = chat.processor.tokenizer
    saved = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        prompts = ["Hi", "Describe every shape in this picture, its colour and its position, in detail please."]
        images = [refs["scene"], refs["gray"]]
        assert chat.generate_batch(images, prompts, **GEN) == [
            chat.generate(i, p, **GEN) for i, p in zip(images, prompts)
        ]
        assert chat.generate_batch([None, None], prompts, **GEN) == [chat.generate(None, p, **GEN) for p in prompts]
    finally:
        tokenizer.padding_side = saved
