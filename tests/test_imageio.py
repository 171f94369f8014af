"""Validated reading: every bad kind of file is refused by name and reason, good ones of every mode load."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tsdf_bench.errors import ImageError
from tsdf_bench.imageio import (contact_sheet, read_folder, read_image, read_image_uint8,
                                tensor_to_uint8, write_png)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` grey pixels, with a tiny (invalid) body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def _make_good(folder):
    """One small image per mode, with a known pixel at (0, 0); returns {name: expected RGB}."""
    expected = {}
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[0, 0] = (10, 200, 30)
    Image.fromarray(rgb).save(folder / "rgb.png"); expected["rgb.png"] = (10, 200, 30)
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=100)
    expected["rgb.jpg"] = None  # lossy: only shape is checked
    grey = np.full((8, 10), 77, np.uint8)
    Image.fromarray(grey, "L").save(folder / "grey.png"); expected["grey.png"] = (77, 77, 77)
    Image.new("1", (10, 8), 1).save(folder / "bilevel.png"); expected["bilevel.png"] = (255, 255, 255)
    deep = np.full((8, 10), 65535, np.uint16)
    deep[0, 0] = 257 * 100
    Image.fromarray(deep).save(folder / "grey16.png"); expected["grey16.png"] = (100, 100, 100)
    pal = Image.new("P", (10, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(folder / "palette.png"); expected["palette.png"] = (255, 0, 0)
    pal_t = pal.copy()
    pal_t.save(folder / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = (255, 255, 255)  # transparent -> white background
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent red -> white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png"); expected["rgba.png"] = (255, 255, 255)
    la = np.zeros((8, 10, 2), np.uint8)
    la[..., 1] = 255  # opaque black
    Image.fromarray(la, "LA").save(folder / "sub" / "la.png"); expected["sub/la.png"] = (0, 0, 0)
    Image.new("CMYK", (10, 8), (0, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    expected["cmyk.jpg"] = None
    return expected


def _make_bad(folder):
    """One file of every bad kind; returns {name: words its reason must contain}."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file, not an image\n")
    good = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(good).save(folder / "whole.png")
    png = bytearray((folder / "whole.png").read_bytes())
    (folder / "whole.png").unlink()
    idat = png.index(b"IDAT")
    png[idat + 20: idat + 60] = b"\xff" * 40  # scramble compressed data (CRC mismatch too)
    (folder / "corrupt.png").write_bytes(bytes(png))
    _png_header_only(folder / "huge.png", 10_000, 6_000)  # 60 MP > 50 MP default limit
    _png_header_only(folder / "bomb.png", 30_000, 30_000)  # 900 MP: Pillow's own bomb error
    return {"empty.jpg": "empty file", "notes.png": "not an image",
            "truncated.jpg": "truncated", "corrupt.png": "corrupt",
            "huge.png": "exceeds the limit", "bomb.png": "too large"}


@pytest.fixture()
def mixed_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    expected = _make_good(tmp_path)
    bad = _make_bad(tmp_path)
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    return tmp_path, expected, bad


def test_folder_with_every_bad_kind_returns_good_images_and_reasons(mixed_folder):
    folder, expected, bad = mixed_folder
    result = read_folder(folder)
    got = {p.relative_to(folder).as_posix(): img for p, img in result.images}
    assert set(got) == set(expected)
    reasons = {p.name: r for p, r in result.failures}
    assert set(reasons) == set(bad)
    for name, words in bad.items():
        assert words in reasons[name], (name, reasons[name])
    for name, rgb in expected.items():
        img = got[name]
        assert img.dtype == torch.float32 and img.shape == (3, 8, 10), name
        assert img.min() >= -1 and img.max() <= 1
        if rgb is not None:
            pixel = tuple(int(v) for v in tensor_to_uint8(img)[0, 0])
            assert pixel == rgb, (name, pixel)
    cmyk = tensor_to_uint8(got["cmyk.jpg"])
    assert cmyk.min() > 240  # CMYK (0,0,0,0) is white


def test_stop_on_error_raises_at_first_bad_file(mixed_folder):
    folder, _, bad = mixed_folder
    with pytest.raises(ImageError) as info:
        read_folder(folder, stop_on_error=True)
    assert info.value.path.rsplit("/", 1)[-1] in bad
    assert info.value.path in str(info.value)


@pytest.mark.parametrize("name", ["empty.jpg", "notes.png", "truncated.jpg", "corrupt.png",
                                  "huge.png", "bomb.png"])
def test_read_image_error_names_file_and_reason(mixed_folder, name):
    folder, _, bad = mixed_folder
    with pytest.raises(ImageError) as info:
        read_image(folder / name)
    assert info.value.path == str(folder / name)
    assert bad[name] in info.value.reason
    assert str(folder / name) in str(info.value)


def test_pixel_limit_is_configurable(mixed_folder):
    folder, _, _ = mixed_folder
    with pytest.raises(ImageError, match="exceeds the limit of 40"):
        read_image(folder / "rgb.png", max_pixels=40)
    assert read_image(folder / "rgb.png", max_pixels=80).shape == (3, 8, 10)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_write_png_round_trip_and_no_overwrite(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    src = write_png(tmp_path / "a.png", arr)
    img = read_image(src)
    assert np.array_equal(read_image_uint8(src), arr)
    out = write_png(tmp_path / "b.png", img)
    assert torch.equal(read_image(out), img)  # lossless for 8-bit data
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_png(out, img)
    write_png(out, -img, overwrite=True)
    assert torch.allclose(read_image(out), -img, atol=1 / 127.5 + 1e-6)
    with pytest.raises(ValueError, match=".png"):
        write_png(tmp_path / "c.jpg", img)


def test_contact_sheet_shape():
    sheet = contact_sheet(torch.zeros(5, 3, 4, 4), nrow=2, pad=1)
    assert sheet.shape == (3, 3 * 5 + 1, 2 * 5 + 1)
