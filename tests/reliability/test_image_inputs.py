"""Odd images are answered as the picture a viewer would show; broken ones are refused, naming the problem.

"Must work" cases are checked against an independent reference: the answer for an odd input (an RGBA image, a 16-bit
PNG, an EXIF-rotated JPEG, ...) must equal the answer for the plain RGB picture a viewer would show. The tiny random
model answers differently for different images (``test_reference_answers_tell_the_images_apart`` guards that), so an
equal answer means the model saw the same picture. Greedy decoding makes the answers deterministic. Every case goes
through a public entry point (``generate``, ``caption`` or ``stream``); the cases are listed in docs/reliability.md.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from reliability.inputs import ENTRIES, HIDDEN, QUESTION, RED, ask, disc_mask, gray, png_bytes, reference_answer, scene


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




def _rgba(refs):
    rgba = scene(background=HIDDEN).convert("RGBA")
    arr = np.asarray(rgba).copy()
    arr[(arr[..., :3] == HIDDEN).all(-1), 3] = 0  # the background is fully transparent; its colour must not show
    return Image.fromarray(arr, "RGBA")


def _la(refs):
    alpha = np.where(disc_mask(), 255, 0).astype(np.uint8)
    return Image.merge("LA", [Image.fromarray(gray()), Image.fromarray(alpha)])


def _p_transparent(refs):
    p = scene(background=HIDDEN).convert("P", palette=Image.Palette.ADAPTIVE)
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
    "grayscale_L": ("stream", lambda r, f: Image.fromarray(gray()), "gray"),
    "png_16bit_file": ("caption", lambda r, f: f["png16"], "gray"),
    "tiff_32bit_integer_file": ("generate", lambda r, f: f["tiff32"], "gray"),
    "one_pixel": ("generate", lambda r, f: Image.new("RGB", (1, 1), RED), "solid_red"),
    "exif_rotated_jpeg": ("generate", lambda r, f: f["exif"], "exif_rotated"),
    "animated_gif_first_frame": ("generate", lambda r, f: f["gif"], "scene"),
    "numpy_hwc_uint8": ("stream", lambda r, f: np.asarray(r["scene"]), "scene"),
    "numpy_hwc_float01": ("generate", lambda r, f: np.asarray(r["scene"], dtype=np.float32) / 255.0, "scene"),
    "numpy_chw_uint8": ("caption", lambda r, f: np.moveaxis(np.asarray(r["scene"]), -1, 0).copy(), "scene"),
    "numpy_uint16": ("generate", lambda r, f: gray().astype(np.uint16) * 257, "gray"),
    "encoded_png_bytes": ("generate", lambda r, f: png_bytes(r["scene"]), "scene"),
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


