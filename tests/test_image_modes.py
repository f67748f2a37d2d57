"""Every image mode a user's folder can hold: read with its values intact, or refused in one line.

Each test writes files in one mode (with Pillow, or by hand where Pillow cannot write the mode)
and checks the exact numbers ``load_data(folder)`` gives (docs/formats.md, "Image folders").
"""

import struct
import zlib

import numpy as np
import pytest
from _cli import run_cli
from PIL import Image, ImageOps

from latentdist.data import ImageOptions, load_data
from latentdist.errors import UsageError

RNG = np.random.default_rng(7)
G8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
ALPHA8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
RAMP16 = np.arange(256 * 256, dtype=np.uint32).astype(np.uint16).reshape(256, 256)


def _folder(tmp_path, name="imgs"):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _raw(folder, **image):
    """(array of the folder as stored, the values take() gives) for one-image folders."""
    src = load_data(str(folder), image=ImageOptions(**image) if image else None)
    return np.asarray(src.array), src.take().numpy()


def _scaled8(v):
    return (np.asarray(v, np.float32) - 127.5) * np.float32(1 / 127.5)


def _white8(v, a):
    """v composited onto white with alpha a, both 0..255: round((v a + 255 (255 - a)) / 255)."""
    v, a = v.astype(np.int64), a.astype(np.int64)
    return ((v * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _white16(v, a):
    v, a = v.astype(np.int64), a.astype(np.int64)
    return ((v * a + 65535 * (65535 - a) + 32767) // 65535).astype(np.uint16)


def _png16(path, arr, trns=None):
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only): (H, W, C), C = 1..4;
    ``trns``: the one colour (a tuple of C 16-bit values) that is transparent."""
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + (chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns)) if trns else b"")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _tiff16_rgb(path, arr):
    """A little-endian, uncompressed 16-bit RGB TIFF written by hand: (H, W, 3) uint16."""
    h, w, _ = arr.shape
    data = arr.astype("<u2").tobytes()
    n = 10
    bps_at = 8 + 2 + 12 * n + 4
    data_at = bps_at + 6

    def short(tag, value):
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    def long(tag, value):
        return struct.pack("<HHII", tag, 4, 1, value)

    entries = [
        short(256, w),
        short(257, h),
        struct.pack("<HHII", 258, 3, 3, bps_at),
        short(259, 1),
        short(262, 2),
        long(273, data_at),
        short(277, 3),
        short(278, h),
        long(279, len(data)),
        short(284, 1),
    ]
    ifd = struct.pack("<H", n) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(
        b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 16, 16, 16) + data
    )


def _one_line_error(folder, *needles, **image):
    with pytest.raises(UsageError) as e:
        load_data(str(folder), image=ImageOptions(**image) if image else None)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ---------------------------------------------------------------- 8-bit: as before, exactly


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_ordinary_8bit_files_read_exactly_as_pillow_decodes_them(tmp_path, ext, mode):
    d = _folder(tmp_path)
    Image.fromarray(G8 if mode == "L" else RGB8, mode).save(d / f"a.{ext}")
    expect = np.asarray(Image.open(d / f"a.{ext}"))
    raw, x = _raw(d)
    assert raw.dtype == np.uint8
    pixels = raw[0, 0] if mode == "L" else raw[0].transpose(1, 2, 0)
    assert np.array_equal(pixels, expect)
    assert np.array_equal(x[0], _scaled8(raw[0]))  # (v - 127.5) / 127.5: [-1, 1]
    # resizing is Pillow's bicubic on the 8-bit image, as before
    raw, _ = _raw(d, resize=(3, 4))
    resized = np.asarray(Image.open(d / f"a.{ext}").resize((4, 3), Image.Resampling.BICUBIC))
    assert np.array_equal(raw[0, 0] if mode == "L" else raw[0].transpose(1, 2, 0), resized)


def test_bilevel_is_black_and_white(tmp_path):
    d = _folder(tmp_path)
    Image.fromarray(G8 > 127).save(d / "a.png")
    assert Image.open(d / "a.png").mode == "1"
    raw, x = _raw(d)
    assert np.array_equal(raw[0, 0], np.where(G8 > 127, 255, 0))
    assert set(np.unique(x)) == {-1.0, 1.0}


def test_palette_images_are_their_colours(tmp_path):
    d = _folder(tmp_path)
    im = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=6)
    im.save(d / "a.png")
    raw, _ = _raw(d)
    assert raw.shape == (1, 3, 5, 7)
    assert np.array_equal(raw[0].transpose(1, 2, 0), np.asarray(im.convert("RGB")))
    raw, _ = _raw(d, channels="grey")
    assert np.array_equal(raw[0, 0], np.asarray(im.convert("RGB").convert("L")))
    # a single-frame GIF is a palette image too
    g = _folder(tmp_path, "gif")
    im.save(g / "a.gif")
    raw, _ = _raw(g)
    assert np.array_equal(raw[0].transpose(1, 2, 0), np.asarray(Image.open(g / "a.gif").convert("RGB")))  # fmt: skip


def test_palette_transparency_is_composited_onto_white(tmp_path):
    d = _folder(tmp_path)
    im = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=6)
    im.save(d / "a.png", transparency=0)
    rgba = np.asarray(Image.open(d / "a.png").convert("RGBA"))
    assert (rgba[..., 3] == 0).any() and (rgba[..., 3] == 255).any()
    raw, _ = _raw(d)
    expect = _white8(rgba[..., :3], rgba[..., 3:])
    assert np.array_equal(raw[0].transpose(1, 2, 0), expect)
    assert (raw[0][:, rgba[..., 3] == 0] == 255).all()  # transparent pixels are white


@pytest.mark.parametrize("grey", [True, False])
def test_alpha_is_composited_onto_white_and_opaque_alpha_changes_nothing(tmp_path, grey):
    colour = G8 if grey else RGB8
    mode = "LA" if grey else "RGBA"
    alpha = ALPHA8[..., None]
    opaque = _folder(tmp_path, "opaque")
    Image.fromarray(np.dstack([colour, np.full_like(ALPHA8, 255)]), mode).save(opaque / "a.png")
    raw, _ = _raw(opaque)
    assert np.array_equal(raw[0].transpose(1, 2, 0), colour.reshape(5, 7, -1))
    partial = _folder(tmp_path, "partial")
    Image.fromarray(np.dstack([colour, ALPHA8]), mode).save(partial / "a.png")
    raw, _ = _raw(partial)
    assert raw.shape[1] == (1 if grey else 3)
    assert np.array_equal(raw[0].transpose(1, 2, 0), _white8(colour.reshape(5, 7, -1), alpha))


def test_grey_transparency_value_is_composited(tmp_path):
    d = _folder(tmp_path)
    g = G8.copy()
    g[0, 0] = 0
    Image.fromarray(g).save(d / "a.png", transparency=0)
    raw, _ = _raw(d)
    assert np.array_equal(raw[0, 0], np.where(g == 0, 255, g))


@pytest.mark.parametrize(("mode", "ext"), [("CMYK", "jpg"), ("CMYK", "tif"), ("YCbCr", "tif")])
def test_cmyk_and_ycbcr_become_rgb(tmp_path, mode, ext):
    d = _folder(tmp_path)
    Image.fromarray(RGB8).convert(mode).save(d / f"a.{ext}", **({"quality": 100} if ext == "jpg" else {}))  # fmt: skip
    with Image.open(d / f"a.{ext}") as im:
        assert im.mode == mode
        expect = np.asarray(im.convert("RGB"))
    raw, _ = _raw(d)
    assert raw.shape == (1, 3, 5, 7)
    assert np.array_equal(raw[0].transpose(1, 2, 0), expect)


# ---------------------------------------------------------------- 16-bit: 16-bit precision


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_keeps_16bit_precision(tmp_path, ext):
    """Before: converted to 8 bits by clipping, so 99.6 % of this ramp read as +1.0."""
    d = _folder(tmp_path)
    Image.fromarray(RAMP16).save(d / f"a.{ext}")
    assert Image.open(d / f"a.{ext}").mode == "I;16"
    raw, x = _raw(d)
    assert raw.dtype == np.uint16 and np.array_equal(raw[0, 0], RAMP16)
    assert len(np.unique(x)) == 65536  # every level kept
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.allclose(x[0, 0], RAMP16 / 65535 * 2 - 1, atol=1e-6, rtol=0)


def test_16bit_colour_png_keeps_16bit_precision(tmp_path):
    rgb = np.stack([RAMP16, RAMP16[::-1], RAMP16.T], axis=-1)
    d = _folder(tmp_path, "rgb")
    _png16(d / "a.png", rgb)
    raw, x = _raw(d)
    assert raw.dtype == np.uint16 and np.array_equal(raw[0].transpose(1, 2, 0), rgb)
    assert np.allclose(x[0], rgb.transpose(2, 0, 1) / 65535 * 2 - 1, atol=1e-6, rtol=0)
    alpha = RAMP16[::-1].T
    d = _folder(tmp_path, "rgba")
    _png16(d / "a.png", np.dstack([rgb, alpha]))
    raw, _ = _raw(d)
    assert np.array_equal(raw[0].transpose(1, 2, 0), _white16(rgb, alpha[..., None]))
    d = _folder(tmp_path, "trns")  # one 16-bit colour marked transparent (tRNS)
    clear = tuple(int(v) for v in rgb[3, 5])
    _png16(d / "a.png", rgb, trns=clear)
    raw, _ = _raw(d)
    hidden = (rgb == np.asarray(clear)).all(-1)
    assert hidden.sum() >= 1 and (raw[0][:, hidden] == 65535).all()
    assert np.array_equal(raw[0][:, ~hidden], rgb[~hidden].T)
    d = _folder(tmp_path, "la")
    _png16(d / "a.png", np.dstack([RAMP16, alpha]))
    raw, _ = _raw(d)
    assert raw.shape == (1, 1, 256, 256)  # grey + alpha is grey (Pillow opens it as RGBA)
    assert np.array_equal(raw[0, 0], _white16(RAMP16, alpha))


def test_16bit_colour_tiff_keeps_16bit_precision(tmp_path):
    rgb = np.stack([RAMP16, RAMP16.T, RAMP16[::-1]], axis=-1)[:40, :50]
    d = _folder(tmp_path)
    _tiff16_rgb(d / "a.tif", rgb)
    assert Image.open(d / "a.tif").mode == "RGB"  # what Pillow alone gives: 8 bits
    raw, _ = _raw(d)
    assert raw.dtype == np.uint16 and np.array_equal(raw[0].transpose(1, 2, 0), rgb)


def test_16bit_channel_conversion_and_resize(tmp_path):
    d = _folder(tmp_path)
    rgb = np.stack([RAMP16, RAMP16[::-1], RAMP16.T], axis=-1)
    _png16(d / "a.png", rgb)
    raw, _ = _raw(d, channels="grey")
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    assert np.array_equal(raw[0, 0], (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)
    g16 = _folder(tmp_path, "grey")
    Image.fromarray(RAMP16).save(g16 / "a.png")
    raw, _ = _raw(g16, channels="rgb")
    assert raw.shape == (1, 3, 256, 256) and all(np.array_equal(c, RAMP16) for c in raw[0])
    # resized in floating point: 16-bit precision survives (not a multiple of 257 as 8 bits)
    raw, _ = _raw(g16, resize=(100, 90))
    ref = Image.fromarray(RAMP16.astype(np.float32), "F").resize(
        (90, 100), Image.Resampling.BICUBIC
    )
    assert np.array_equal(raw[0, 0], np.clip(np.rint(np.asarray(ref)), 0, 65535))
    assert len(np.unique(raw)) > 5000


def test_8bit_images_in_a_16bit_folder_keep_their_values(tmp_path):
    d = _folder(tmp_path)
    Image.fromarray(G8).save(d / "a.png")
    alone, x_alone = _raw(d)
    Image.fromarray(G8.astype(np.uint16) * 250).save(d / "b.png")
    raw, x = _raw(d)
    assert raw.dtype == np.uint16 and np.array_equal(raw[0], alone[0].astype(np.uint16) * 257)
    assert np.allclose(x[0], x_alone[0], atol=1e-6, rtol=0)  # 255 * 257 = 65535: same scale
    assert np.array_equal(raw[1, 0], G8.astype(np.uint16) * 250)


# ---------------------------------------------------------------- EXIF orientation


def _oriented(a, orientation):
    """What a viewer shows for stored pixels ``a`` with EXIF orientation 1..8."""
    return {
        1: a,
        2: a[:, ::-1],
        3: a[::-1, ::-1],
        4: a[::-1],
        5: a.T,
        6: np.rot90(a, -1),
        7: np.rot90(a, -1)[::-1],
        8: np.rot90(a),
    }[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    d = _folder(tmp_path)
    blocks = np.kron(np.array([[0, 80, 160], [240, 120, 40]], np.uint8), np.ones((8, 8), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(blocks).save(d / "a.jpg", exif=exif, quality=100)
    raw, _ = _raw(d)
    with Image.open(d / "a.jpg") as im:
        expect = np.asarray(ImageOps.exif_transpose(im))
    assert raw.shape == (1, 1, *expect.shape) and np.array_equal(raw[0, 0], expect)
    want = _oriented(blocks, orientation)  # and it is the upright picture
    assert raw.shape[2:] == want.shape and np.abs(raw[0, 0].astype(int) - want).max() <= 3
    # a folder of one upright and one rotated photo of the same scene has one size
    Image.fromarray(np.ascontiguousarray(_oriented(blocks, orientation))).save(d / "b.png")
    assert load_data(str(d)).sample_shape == (1, *want.shape)


# ---------------------------------------------------------------- refused, in one line


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_integer_and_float_images_are_refused(tmp_path, mode):
    d = _folder(tmp_path)
    arr = (G8.astype(np.int32) * 1000) if mode == "I" else G8.astype(np.float32) / 255
    Image.fromarray(arr).save(d / "a.tif")
    assert Image.open(d / "a.tif").mode == mode
    _one_line_error(d, d / "a.tif", f"mode {mode}", ".npy")


@pytest.mark.parametrize("ext", ["gif", "tif"])
def test_multi_frame_files_are_refused(tmp_path, ext):
    d = _folder(tmp_path)
    frames = [Image.fromarray(RGB8), Image.fromarray(255 - RGB8)]
    frames[0].save(d / f"a.{ext}", save_all=True, append_images=frames[1:])
    _one_line_error(d, d / f"a.{ext}", "2 frames")


def test_a_camera_jpeg_holding_extra_pictures_reads_its_first(tmp_path):
    """MPO (a JPEG with e.g. a depth map or a second view after it): the photograph is read."""
    d = _folder(tmp_path)
    first, second = Image.fromarray(RGB8), Image.fromarray(255 - RGB8)
    first.save(d / "a.jpg", format="MPO", save_all=True, append_images=[second], quality=100)
    with Image.open(d / "a.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
        expect = np.asarray(im.convert("RGB"))
    raw, _ = _raw(d)
    assert np.array_equal(raw[0].transpose(1, 2, 0), expect)


def test_refusal_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    d = _folder(tmp_path)
    Image.fromarray(G8.astype(np.float32)).save(d / "a.tif")
    code, _, err = run_cli(["measure", "--latents", "x.npy", "--data", str(d)], capsys)
    assert code == 2 and err.count("\n") == 1 and str(d / "a.tif") in err and "Traceback" not in err
