"""The one image loader / saver: 8- and 16-bit PNG, palette, alpha, float TIFF, EXIF orientation,
grey <-> RGB, and the [1, C, H, W] float convention."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from hessdiff.utils.images import from_uint8, load_image, save_image, to_uint8, to_uint8_array


def _rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _from_u8(u: np.ndarray) -> torch.Tensor:
    """The float image of an 8-bit array ``[H, W]`` / ``[H, W, C]`` as ``[1, C, H, W]``."""
    a = (u if u.ndim == 3 else u[..., None]).astype(np.float64) / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()


def _png16(path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey ``[H, W]`` or RGB ``[H, W, 3]``) written byte by byte."""
    h, w = arr.shape[:2]
    colour = {2: 0, 3: 2}[arr.ndim]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------- 8-bit
def test_8bit_grey_and_rgb_are_read_exactly(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgb = _rgb(0)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    g, c = load_image(tmp_path / "g.png"), load_image(tmp_path / "c.png")
    assert g.shape == (1, 1, 6, 8) and c.shape == (1, 3, 6, 5) and g.dtype == c.dtype == torch.float32
    assert torch.equal(g, _from_u8(grey)) and torch.equal(c, _from_u8(rgb))
    assert torch.equal(to_uint8(g)[0, 0], torch.from_numpy(grey))  # the file's 8-bit data, exactly
    assert torch.equal(to_uint8(c)[0], torch.from_numpy(rgb).permute(2, 0, 1))


def test_grey_rgb_conversion_on_request(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    rgb = _rgb(1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    g3 = load_image(tmp_path / "g.png", channels=3)
    assert g3.shape == (1, 3, 8, 8) and torch.equal(to_uint8(g3)[0], torch.from_numpy(grey).expand(3, 8, 8))
    c1 = load_image(tmp_path / "c.png", channels=1)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))  # Pillow's ITU-R 601-2 luma
    assert c1.shape == (1, 1, 6, 5) and torch.equal(c1, _from_u8(luma))
    assert torch.equal(load_image(tmp_path / "g.png", channels=1), load_image(tmp_path / "g.png"))
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "g.png", channels=2)


def test_palette_and_bilevel_images(tmp_path):
    rgb = _rgb(2)
    pal = Image.fromarray(rgb).quantize(colors=5)
    assert pal.mode == "P"
    pal.save(tmp_path / "p.png")
    x = load_image(tmp_path / "p.png")
    assert x.shape == (1, 3, 6, 5) and torch.equal(x, _from_u8(np.asarray(pal.convert("RGB"))))
    bits = Image.fromarray(rgb[..., 0] > 127).convert("1")
    bits.save(tmp_path / "b.png")
    b = load_image(tmp_path / "b.png")
    assert b.shape == (1, 1, 6, 5) and set(b.unique().tolist()) <= {-1.0, 1.0}


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.dstack([_rgb(3), np.zeros((6, 5), np.uint8)])  # fully transparent: compositing would give white
    Image.fromarray(rgba).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert torch.equal(x, _from_u8(rgba[..., :3]))
    la = Image.fromarray(rgba[..., :2].copy(), mode="LA")
    la.save(tmp_path / "la.png")
    assert torch.equal(load_image(tmp_path / "la.png"), _from_u8(rgba[..., 0]))


# ----------------------------------------------------------------------------------------- 16-bit
def test_16bit_grey_gradient_does_not_saturate(tmp_path):
    grad = np.linspace(0, 65535, 64 * 4).round().astype(np.uint16).reshape(4, 64)
    _png16(tmp_path / "g16.png", grad)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
        saturated = np.asarray(im.convert("RGB"))[..., 0]
    assert (saturated == 255).mean() > 0.9  # what Image.convert("RGB") makes of it
    x = load_image(tmp_path / "g16.png")
    want = torch.from_numpy(grad.astype(np.float64) / 65535 * 2 - 1)
    assert x.shape == (1, 1, 4, 64)
    assert float((x[0, 0].double() - want).abs().max()) <= 2 / 65535
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0 and len(x.unique()) == grad.size
    x3 = load_image(tmp_path / "g16.png", channels=3)  # requested colour: the grey values, three times
    assert x3.shape == (1, 3, 4, 64) and torch.equal(x3, x.expand(1, 3, 4, 64))


def test_16bit_grey_round_trip_through_save_image(tmp_path):
    x = torch.linspace(-1, 1, 3 * 50, dtype=torch.float64).reshape(1, 1, 3, 50)
    path = save_image(x, tmp_path / "r16.png", bits=16)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
    y = load_image(path)
    assert float((y.double() - x).abs().max()) <= 2 / 65535
    with pytest.raises(ValueError, match="grey"):
        save_image(torch.zeros(3, 4, 4), tmp_path / "c16.png", bits=16)


def test_16bit_colour_png_is_read_at_8_bits_not_saturated(tmp_path):
    arr = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 3000).astype(np.uint16)
    _png16(tmp_path / "c16.png", arr)
    x = load_image(tmp_path / "c16.png")
    want = torch.from_numpy(arr.astype(np.float64) / 65535 * 2 - 1).permute(2, 0, 1)
    assert x.shape == (1, 3, 2, 3) and float((x[0].double() - want).abs().max()) <= 2 / 255


# ----------------------------------------------------------------------------------------- float, EXIF
def test_float_tiff_values_are_unit_intensities_clipped(tmp_path):
    v = np.array([[-0.5, 0.0, 0.25], [0.5, 1.0, 1.5]], dtype=np.float32)
    Image.fromarray(v).save(tmp_path / "f.tif")
    x = load_image(tmp_path / "f.tif")
    assert x.shape == (1, 1, 2, 3)
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, -1.0, -0.5], [0.0, 1.0, 1.0]]), rtol=0, atol=1e-7)
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN"):
        load_image(tmp_path / "nan.tif")


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rgb(4, h=2, w=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    x = load_image(tmp_path / "o.png")
    upright = np.rot90(rgb, k=-1)
    assert x.shape == (1, 3, 3, 2) and torch.equal(x, _from_u8(np.ascontiguousarray(upright)))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read an image"):
        load_image(tmp_path / "junk.png")


# ----------------------------------------------------------------------------------------- saving
def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 9, 7, generator=g) * 2.2 - 1.1
    path = save_image(x, tmp_path / "out" / "img.png", mkdir=True)
    u = to_uint8(x.double())  # what is written: the exactly rounded 8-bit image
    assert torch.equal(to_uint8(load_image(path)), u)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_image(from_uint8(u), path)
    save_image(from_uint8(u), path, overwrite=True)  # exact for 8-bit values
    assert torch.equal(to_uint8(load_image(path)), u)
    save_image(u[0], path, overwrite=True)  # uint8 is written as it is
    assert torch.equal(to_uint8(load_image(path)), u)
    assert sorted(p.name for p in path.parent.iterdir()) == ["img.png"]  # no temporary files left
    with pytest.raises(ValueError, match="one image"):
        save_image(torch.cat([x, x]), tmp_path / "b.png")
    with pytest.raises(FileNotFoundError):
        save_image(x, tmp_path / "missing" / "c.png")


def test_save_grey_and_formats(tmp_path):
    x = torch.linspace(-1, 1, 20).reshape(1, 1, 4, 5)
    p = save_image(x, tmp_path / "g.png")
    with Image.open(p) as im:
        assert im.mode == "L" and im.format == "PNG"
    assert load_image(p).shape == (1, 1, 4, 5)
    with Image.open(save_image(x[0], tmp_path / "g.jpg")) as im:
        assert im.format == "JPEG"
    with Image.open(save_image(x, tmp_path / "noext")) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="cannot write"):
        save_image(x, tmp_path / "g.xyz")


def test_quantisation_precisions():
    x = torch.tensor([-3.0, -1.0, -1 + 1 / 255, 0.0, 1 - 1 / 255, 1.0, 7.0])
    # float32 arithmetic (the metrics' to_uint8) vs float64 (files): 1 - 1/255 rounds to 254.5 - ulp / + ulp
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 254, 255, 255]
    assert to_uint8(x.double()).tolist() == [0, 0, 0, 128, 255, 255, 255]
    assert to_uint8_array(x.reshape(1, 1, 7)).tolist() == [[0, 0, 0, 128, 255, 255, 255]]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u) and torch.equal(to_uint8(from_uint8(u).double()), u)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_array(torch.full((1, 2, 2), float("nan")))


def test_load_image_pixel_limit_and_decompression_bomb(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from hessdiff.utils.images import ImageTooLargeError, load_image

    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(p)
    with pytest.raises(ImageTooLargeError, match=r"50x40 = 0.0 MP, more than the limit"):
        load_image(p, max_pixels=1999)
    assert load_image(p, max_pixels=2000).shape == (1, 1, 40, 50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL's bomb limit: its error becomes ours
    with pytest.raises(ImageTooLargeError, match="too large"):
        load_image(p)
    assert load_image(p, max_pixels=10**6).shape == (1, 1, 40, 50)  # max_pixels replaces PIL's limit
    assert Image.MAX_IMAGE_PIXELS == 500
