"""Image decoding: every mode to RGB on pixel values, and every failure as BadImageError."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embbench.images import BadImageError, check_image, load_rgb, to_rgb


def _px(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in im.getpixel(xy))


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def _png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that declares a huge size (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_rgb_jpeg_roundtrip(tmp_path):
    p = tmp_path / "red.jpg"
    Image.new("RGB", (16, 12), (250, 10, 10)).save(p, quality=95)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (16, 12)
    assert _close(_px(im, (8, 6)), (250, 10, 10), 6)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_grayscale_replicated(tmp_path, suffix):
    p = tmp_path / f"gray{suffix}"
    Image.new("L", (8, 8), 77).save(p)
    im = load_rgb(p)
    r, g, b = _px(im, (4, 4))
    assert im.mode == "RGB" and r == g == b and abs(r - 77) <= 2


def test_one_bit(tmp_path):
    p = tmp_path / "bw.png"
    im1 = Image.new("1", (8, 8), 0)
    im1.putpixel((1, 1), 1)
    im1.save(p)
    im = load_rgb(p)
    assert _px(im, (0, 0)) == (0, 0, 0) and _px(im, (1, 1)) == (255, 255, 255)


def test_cmyk_pure_cyan_tiff_exact(tmp_path):
    p = tmp_path / "cyan.tif"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p)
    assert Image.open(p).mode == "CMYK"
    assert _px(load_rgb(p)) == (0, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cyan.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    assert _close(_px(load_rgb(p), (8, 8)), (0, 255, 255), 8)


def test_palette_with_transparency_on_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)  # 0 = blue, 1 = red
    im.putpixel((3, 3), 1)
    im.info["transparency"] = 0
    im.save(p, transparency=0)
    assert "transparency" in Image.open(p).info
    out = load_rgb(p)
    assert _px(out, (0, 0)) == (255, 255, 255)  # transparent blue -> white
    assert _px(out, (3, 3)) == (255, 0, 0)  # opaque red stays red


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "pal.gif"
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0] + [0, 128, 0] + [0, 0, 0] * 254)
    im.save(p)
    assert _px(load_rgb(p)) == (0, 128, 0)


def test_la_alpha_composited_on_white(tmp_path):
    p = tmp_path / "la.png"
    arr = np.zeros((8, 8, 2), np.uint8)
    arr[..., 0] = 40
    arr[:, :4, 1] = 255  # left opaque
    arr[:, 4:, 1] = 0  # right transparent
    Image.fromarray(arr, mode="LA").save(p)
    out = load_rgb(p)
    assert _px(out, (0, 0)) == (40, 40, 40)
    assert _px(out, (7, 0)) == (255, 255, 255)


def test_rgba_half_alpha_blends_with_white(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 128)).save(p)
    r, g, b = _px(load_rgb(p))
    assert r == g == b and abs(r - 127) <= 1


def test_grayscale_png_with_transparent_colour(tmp_path):
    p = tmp_path / "ltrns.png"
    im = Image.new("L", (8, 8), 0)
    im.putpixel((2, 2), 200)
    im.save(p, transparency=0)
    out = load_rgb(p)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (2, 2)) == (200, 200, 200)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2] = 65535, 32768, 1000
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_rgb(p)
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (128, 128, 128)
    assert _px(out, (2, 0)) == (4, 4, 4)  # 1000 * 255 / 65535 = 3.9, not clipped to 255
    assert _px(out, (3, 0)) == (0, 0, 0)


def test_int32_and_float_modes():
    i8 = Image.fromarray(np.full((2, 2), 200, np.int32), mode="I")
    assert _px(to_rgb(i8)) == (200, 200, 200)
    f = Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F")
    assert _px(to_rgb(f)) == (128, 128, 128)


def test_exif_orientation_6_rotates(tmp_path):
    p = tmp_path / "rot.jpg"
    arr = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 tall: left red, right blue
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(p, exif=exif.tobytes(), quality=95)
    out = load_rgb(p)
    assert out.size == (8, 16)  # width and height swapped
    assert _close(_px(out, (4, 2)), (255, 0, 0), 40)  # the left (red) half is now on top
    assert _close(_px(out, (4, 13)), (0, 0, 255), 40)


def test_draft_decodes_large_jpeg_at_reduced_scale(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (256, 192), (0, 200, 0)).save(p)
    assert load_rgb(p).size == (256, 192)
    assert load_rgb(p, target_size=24).size == (32, 24)  # 1/8: both sides still >= 24
    assert load_rgb(p, target_size=(90, 60)).size == (128, 96)  # 1/2 (the larger side counts)
    assert load_rgb(p, target_size=224).size == (256, 192)  # too small to reduce
    png = tmp_path / "big.png"
    Image.new("RGB", (256, 192)).save(png)
    assert load_rgb(png, target_size=24).size == (256, 192)  # only JPEGs are drafted


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.jpg"
    p.touch()
    with pytest.raises(BadImageError, match="empty file") as err:
        load_rgb(p)
    assert err.value.path == str(p)
    assert check_image(p) == "empty file (0 bytes)"


@pytest.mark.parametrize("keep", [0.5, 200])
def test_truncated_jpeg(tmp_path, keep):
    p = tmp_path / "trunc.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])  # in pixels / in header
    with pytest.raises(BadImageError, match="truncated") as err:
        load_rgb(p)
    assert str(p) in str(err.value)
    reason = check_image(p)
    assert reason is not None and "truncated" in reason


def test_truncated_png(tmp_path):
    p = tmp_path / "trunc.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError):
        load_rgb(p)


def test_non_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("<html>404 Not Found</html>")
    with pytest.raises(BadImageError, match="not an image"):
        load_rgb(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(BadImageError, match="folder"):
        load_rgb(tmp_path)


def test_decompression_bomb_beyond_pillow_limit(tmp_path):
    p = _png_header(tmp_path / "bomb.png", 30_000, 30_000)  # 900 Mpx, 60 bytes on disk
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(p)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_by_max_pixels(tmp_path):
    p = _png_header(tmp_path / "bomb.png", 10_000, 10_000)  # 100 Mpx > default 89.5 Mpx
    with pytest.raises(BadImageError, match="decompression bomb.*100,000,000"):
        load_rgb(p)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    assert load_rgb(small, max_pixels=400).size == (20, 20)
    with pytest.raises(BadImageError, match="exceeds the limit of 399"):
        load_rgb(small, max_pixels=399)


def test_check_image_good_and_error_pickles(tmp_path):
    p = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(p)
    assert check_image(p) is None
    err = pickle.loads(pickle.dumps(BadImageError(p, "why")))
    assert err.path == str(p) and err.reason == "why"


def test_returned_image_is_detached_from_file(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(p)
    im = load_rgb(p)
    p.unlink()
    assert _px(im.resize((2, 2))) == (1, 2, 3)
