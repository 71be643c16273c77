"""Fixtures of the reliability tests: odd and broken image files, their reference pictures, one tiny saved model.

Session-scoped: every file here asks the same tiny model, so it is built and loaded once for the whole directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability.inputs import GIF_SECOND_FRAME, RED, disc_mask, gray, png_bytes, png_header_only, scene
from vlm_chat import VLMChat


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Odd and broken image files, written once per session."""
    d = tmp_path_factory.mktemp("reliability_images")
    out = {}
    out["png16"] = d / "gray16.png"
    Image.fromarray(gray().astype(np.uint16) * 257).save(out["png16"])  # 16-bit PNG, full range
    out["tiff32"] = d / "gray32.tif"
    Image.fromarray(gray().astype(np.int32) * 1000).save(out["tiff32"])  # 32-bit signed integer TIFF
    out["exif"] = d / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: "rotate 90 degrees clockwise to display"
    scene(size=(64, 40)).save(out["exif"], quality=95, exif=exif)
    out["gif"] = d / "animated.gif"
    scene().save(out["gif"], save_all=True, append_images=[scene(**GIF_SECOND_FRAME)], duration=100, loop=0)
    out["unicode"] = d / "фото 图像 😀.png"  # spaces and non-ASCII, as user files are named
    scene().save(out["unicode"])
    out["text"] = d / "notes.png"
    out["text"].write_text("this is a text file with an image name")
    out["truncated"] = d / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out["truncated"].write_bytes(png_bytes(Image.fromarray(noise))[:-100])
    out["bomb"] = d / "bomb_81mp.png"
    out["bomb"].write_bytes(png_header_only(9000, 9000))  # 81 MP: over our 64 MP cap, under PIL's own warning
    out["huge_bomb"] = d / "bomb_400mp.png"
    out["huge_bomb"].write_bytes(png_header_only(20000, 20000))  # 400 MP: PIL's DecompressionBombError
    out["empty"] = d / "empty.png"
    out["empty"].write_bytes(b"")
    return out


@pytest.fixture(scope="session")
def refs(files) -> dict[str, Image.Image]:
    """The plain RGB pictures a viewer shows for each odd input."""
    pixels = gray()
    on_white = pixels.copy()
    on_white[~disc_mask()] = 255
    with Image.open(files["exif"]) as jpeg:  # the JPEG's own pixels, EXIF not applied
        stored = jpeg.convert("RGB")
    return {
        "scene": scene(),
        "scene_on_white": scene(background=(255, 255, 255)),
        "gray": Image.fromarray(pixels).convert("RGB"),
        "gray_disc_on_white": Image.fromarray(on_white).convert("RGB"),
        "solid_red": Image.new("RGB", (64, 64), RED),
        "exif_rotated": stored.transpose(Image.Transpose.ROTATE_270),  # what orientation 6 displays
        "exif_unrotated": stored,
        "gif_second_frame": scene(**GIF_SECOND_FRAME),
    }




@pytest.fixture(scope="session")
def ckpt(tmp_path_factory, tiny_clip_dir, tiny_llama_dir) -> Path:
    """A saved tiny VLM (CLIP + Llama-3-template LLM); the API and the CLI load the same directory."""
    path = tmp_path_factory.mktemp("reliability_ckpt") / "model"
    VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat(ckpt) -> VLMChat:
    return VLMChat.from_pretrained(ckpt, device="cpu")

