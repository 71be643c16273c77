"""load_image: every kind of image a user may hand over becomes RGB, or is refused with a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm_chat.images import load_image


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F"])
def test_modes_become_rgb(mode):
    base = Image.new("RGB", (8, 6), (200, 30, 30))
    if mode in ("I;16", "I", "F"):
        arr = np.linspace(0, {"I;16": 65535, "I": 2**20, "F": 1.0}[mode], 48).reshape(6, 8)
        img = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert img.mode == mode
    else:
        img = base.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode in ("I;16", "I", "F"):  # scaled to 8 bits, not clipped to white
        values = np.asarray(out)[..., 0]
        assert values.min() == 0 and values.max() == 255


def test_transparent_pixels_are_composited_on_white():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 30)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_image(tmp_path / "a.gif").getpixel((0, 0))
    assert r > 200 and b < 50


def test_numpy_arrays():
    assert load_image(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)
    assert load_image(np.ones((5, 7), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((3, 5, 7), np.uint8)).size == (7, 5)  # CHW
    with pytest.raises(ValueError, match="rank 4"):
        load_image(np.zeros((1, 2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0))


def test_paths_bytes_and_refusals(tmp_path):
    img = Image.new("RGB", (3, 3))
    (tmp_path / "ok.png").write_bytes(_png_bytes(img))
    assert load_image(str(tmp_path / "ok.png")).size == (3, 3)
    assert load_image(_png_bytes(img)).size == (3, 3)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt: not a readable image"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "cut.png").write_bytes(_png_bytes(Image.new("RGB", (64, 64)))[:60])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="image bytes"):
        load_image(b"\x00\x01garbage")
    with pytest.raises(TypeError, match="must be a PIL.Image"):
        load_image(12)


def test_pixel_cap_refuses_bombs(tmp_path):
    Image.new("L", (2000, 2000)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="over the limit"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
