"""The decoder against Pillow, image by image: every format and colour mode, EXIF
orientation, DCT-domain downscaling, the simplejpeg path, decompression bombs and
corrupt or truncated files.

The reference is what a user would write by hand:
``np.asarray(ImageOps.exif_transpose(Image.open(f)).convert(mode))``. Lossless formats
must match it exactly; a JPEG decoded by another libjpeg-turbo build within 2 levels.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from imagegen import make_image
from pixcrawler import config
from pixcrawler.decode import (
    UNKNOWN_ORIENTATION,
    ImageBuffers,
    ImageDecoder,
    _pillow_orientation,
    jpeg_orientation,
)
from pixcrawler.exceptions import DecompressionError

pytestmark = pytest.mark.timeout(60)

simplejpeg = pytest.importorskip("simplejpeg")

MODES = ("RGB", "L", "RGBA")
CHANNELS = {"RGB": 3, "L": 1, "RGBA": 4}
LOSSY = {"JPEG": 2}


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def reference(data: bytes, mode: str) -> np.ndarray:
    """What Pillow shows: first frame, EXIF orientation applied, converted to ``mode``
    (16-bit gray by its high byte, as Pillow converts 16-bit RGB; its convert() clips)."""
    with Image.open(io.BytesIO(data)) as image:
        shown = ImageOps.exif_transpose(image)
        if shown.mode.startswith("I;16"):
            shown = Image.fromarray((np.asarray(shown) >> 8).astype(np.uint8), "L")
        shown = shown.convert(mode)
        array = np.asarray(shown)
    return array.reshape(array.shape[0], array.shape[1], -1)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def photo(size: tuple[int, int] = (36, 52), index: int = 0, mode: str = "RGB") -> Image.Image:
    return make_image("cat", size, seed=11, index=index, mode=mode)


# -- pixels like Pillow's -------------------------------------------------------------------

SOURCES: dict[str, Callable[[], bytes]] = {
    "jpeg-rgb": lambda: encode(photo(), "JPEG", quality=90),
    "jpeg-gray": lambda: encode(photo(mode="L"), "JPEG", quality=90),
    "jpeg-cmyk": lambda: encode(photo().convert("CMYK"), "JPEG", quality=90),
    "jpeg-progressive": lambda: encode(photo(), "JPEG", quality=85, progressive=True),
    "jpeg-420": lambda: encode(photo((33, 47)), "JPEG", quality=80, subsampling=2),
    "png-rgb": lambda: encode(photo(), "PNG"),
    "png-rgba": lambda: encode(photo(mode="RGBA"), "PNG"),
    "png-gray": lambda: encode(photo(mode="L"), "PNG"),
    "png-la": lambda: encode(photo(mode="RGBA").convert("LA"), "PNG"),
    "png-palette": lambda: encode(photo(mode="P"), "PNG"),
    "png-palette-transparent": lambda: encode(photo(mode="P"), "PNG", transparency=3),
    "png-16bit": lambda: encode(
        Image.fromarray(np.arange(36 * 52, dtype=np.uint16).reshape(36, 52) * 37), "PNG"
    ),
    "png-1bit": lambda: encode(photo().convert("1"), "PNG"),
    "gif": lambda: encode(photo(mode="P"), "GIF"),
    "gif-transparent": lambda: encode(photo(mode="P"), "GIF", transparency=5),
    "bmp": lambda: encode(photo(), "BMP"),
    "tiff": lambda: encode(photo(), "TIFF"),
    "tiff-rgba": lambda: encode(photo(mode="RGBA"), "TIFF", compression="tiff_deflate"),
    "webp-lossy": lambda: encode(photo(), "WEBP", quality=80),
    "webp-lossless-rgba": lambda: encode(photo(mode="RGBA"), "WEBP", lossless=True),
}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_an_image_pillow_cannot_convert_is_refused_not_given_other_colours(mode: str) -> None:
    """Pillow opens a LAB TIFF, and "converts" it to RGB with other colours."""
    out = io.BytesIO()
    Image.new("LAB", (8, 8), (50, 10, 20)).save(out, "TIFF")
    with pytest.raises(DecompressionError, match="LAB images are not supported"):
        ImageDecoder(mode).decode(out.getvalue())


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint32, np.float32])
def test_a_grey_tiff_deeper_than_16_bits_unsigned_is_refused_not_clipped(dtype: Any) -> None:
    """Pillow opens these as 32-bit integer or float grey and clips them to 0..255: a dark
    to bright ramp came back black and white (or, 0..1 floats, black)."""
    ramp = np.linspace(0, 1, 12) * (1.0 if dtype == np.float32 else np.iinfo(dtype).max)
    out = io.BytesIO()
    Image.fromarray(np.tile(ramp.astype(dtype), (4, 1))).save(out, "TIFF")
    for mode in ("RGB", "L"):
        with pytest.raises(DecompressionError, match=r"TIFF (I|F) images are not supported"):
            ImageDecoder(mode).decode(out.getvalue())
    # A 16-bit grey PNG still decodes, to its high byte.
    out = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 12).astype(np.uint16), (4, 1))).save(out, "PNG")
    image = ImageDecoder("L").decode(out.getvalue())
    assert image[0, :, 0].tolist() == (np.linspace(0, 65535, 12).astype(np.uint16) >> 8).tolist()


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """An RGB TIFF of one deflated ``tile`` x ``tile`` tile (of zeros) covering the image."""
    deflate, row = zlib.compressobj(9), bytes(tile * 3)
    data = b"".join(deflate.compress(row) for _ in range(tile)) + deflate.flush()
    tags = [
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 2),
        (277, 3, 3), (284, 3, 1), (322, 4, tile), (323, 4, tile),
        (324, 4, 8 + 2 + 12 * 11 + 4), (325, 4, len(data)),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value)
        if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + data


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_tiff_in_tiles_far_larger_than_its_image_is_refused(backend: str) -> None:
    """libtiff inflates a whole tile: an 800 KB file of an 8x8 image took 800 MB at
    16384x16384, whatever the pixel limit said."""
    decoder = ImageDecoder(backend=backend)
    with pytest.raises(DecompressionError, match="tiles of 16,908,544 pixels"):
        decoder.decode(tiled_tiff(8, 8, 4112))
    usual = ((8, 8, 16), (100, 100, 256), (300, 200, 512), (600, 400, 1024), (8, 8, 4096))
    for width, height, tile in usual:  # as GDAL, ImageMagick and libtiff write them
        decoded = decoder.decode(tiled_tiff(width, height, tile))
        assert decoded.shape == (height, width, 3) and not decoded.any()


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_progressive_jpeg_of_more_scans_than_any_encoder_writes_is_refused(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each scan decodes the whole image again: a thousand repeats of one took seconds."""
    data = encode(photo((64, 64)), "JPEG", quality=80, progressive=True)
    last = data.rfind(b"\xff\xda")
    bomb = data[:-2] + data[last:-2] * 300 + b"\xff\xd9"
    decoder = ImageDecoder(backend=backend)
    assert decoder.decode(data).shape == (64, 64, 3)  # its own ten scans or so
    with pytest.raises(DecompressionError, match=r"progressive JPEG of 3\d\d scans, over the"):
        decoder.decode(bomb)
    # Counted only between the first scan and the end of the image: not in a segment
    # before it (a comment here; an EXIF thumbnail is a whole JPEG), nor in what a phone
    # appends after it.
    comment = b"\xff\xda" * 300
    commented = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    for padded in (commented, data + b"\xff\xda" * 300):
        assert decoder.decode(padded).shape == (64, 64, 3)
    monkeypatch.setattr(config, "MAX_JPEG_SCANS", 1000)
    assert decoder.decode(bomb).shape == (64, 64, 3)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_tiny_jpegs_scaled_down_are_the_same_pixels_from_either_decoder(mode: str) -> None:
    """For an image of a few pixels simplejpeg would pick another DCT scale than Pillow's
    draft (3/8 for 3x3 to 1x1, where Pillow takes 1/2): such images go to Pillow."""
    rng = np.random.default_rng(0)
    for side in range(2, 25):
        for width in (side, side + 1):
            noise = Image.fromarray((rng.random((side, width, 3)) * 255).astype(np.uint8))
            data = encode(noise, "JPEG", quality=90)
            for divisor in (2, 3, 4, 5, 8):
                if side // divisor < 1:
                    continue
                size = (side // divisor, width // divisor)
                fast = ImageDecoder(mode, size).decode(data)
                slow = ImageDecoder(mode, size, backend="pillow").decode(data)
                assert max_diff(fast, slow) <= LOSSY["JPEG"], (side, width, size)


def test_the_sources_are_in_the_modes_they_claim() -> None:
    def opened_mode(name: str) -> str:
        with Image.open(io.BytesIO(SOURCES[name]())) as image:
            return image.mode

    assert opened_mode("jpeg-cmyk") == "CMYK"
    assert opened_mode("png-16bit") in ("I;16", "I")
    assert opened_mode("png-la") == "LA"
    assert opened_mode("png-palette-transparent") == "P"
    assert opened_mode("png-1bit") == "1"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_pixels_match_pillow(source: str, mode: str, backend: str) -> None:
    data = SOURCES[source]()
    decoded = ImageDecoder(mode, backend=backend).decode(data)
    expected = reference(data, mode)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    assert decoded.shape[2] == CHANNELS[mode]
    tolerance = 2 if source.startswith("jpeg") else 0
    assert max_diff(decoded, expected) <= tolerance, (source, mode, backend)


def test_palette_transparency_becomes_alpha() -> None:
    image = photo(mode="P")
    data = encode(image, "PNG", transparency=3)
    rgba = ImageDecoder("RGBA").decode(data)
    transparent = np.asarray(image) == 3
    assert transparent.any() and (rgba[..., 3][transparent] == 0).all()
    assert (rgba[..., 3][~transparent] == 255).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_a_palette_png_with_an_alpha_per_entry_decodes_without_a_warning(mode: str) -> None:
    """pngquant's kind of PNG-8 (a tRNS of one alpha per palette entry): Pillow warned
    converting it to RGB or L, so under -W error it was refused as a corrupt image."""
    image = photo(mode="P")
    alphas = bytes([0, 64, 128] + [255] * 253)
    data = encode(image, "PNG", transparency=alphas)
    with Image.open(io.BytesIO(data)) as opened:
        assert isinstance(opened.info["transparency"], bytes)
        expected = np.asarray(opened.convert("RGBA").convert(mode))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = ImageDecoder(mode).decode(data)
    assert max_diff(decoded, expected.reshape(decoded.shape)) == 0
    if mode == "RGBA":
        assert (decoded[..., 3][np.asarray(image) == 1] == 64).all()


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [photo(index=i, mode="P") for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 3
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"))
    decoded = ImageDecoder().decode(data)
    assert max_diff(decoded, reference(data, "RGB")) == 0
    assert max_diff(decoded, np.asarray(frames[0].convert("RGB"))) == 0
    assert np.abs(decoded.astype(int) - second.astype(int)).max() > 0


def test_decoded_arrays_are_writable_and_owned() -> None:
    for data in (SOURCES["jpeg-rgb"](), SOURCES["png-rgb"]()):
        for backend in ("auto", "pillow"):
            array = ImageDecoder(backend=backend).decode(memoryview(data))
            assert array.flags.writeable and array.flags.c_contiguous


# -- reusable output buffers ----------------------------------------------------------------


def jpegs(count: int, size: tuple[int, int] = (40, 56)) -> list[bytes]:
    return [encode(photo(size, index=i), "JPEG", quality=90) for i in range(count)]


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_buffered_decoding_gives_the_same_pixels() -> None:
    data = jpegs(6)
    plain = ImageDecoder()
    buffered = ImageDecoder(buffers=ImageBuffers(2))
    for blob in data:
        image = buffered.decode(blob)
        assert image.flags.writeable and image.flags.c_contiguous
        assert np.array_equal(image, plain.decode(blob))


def test_a_dropped_image_gives_its_buffer_to_the_next() -> None:
    buffers = ImageBuffers(4)
    decoder = ImageDecoder(buffers=buffers)
    data = jpegs(20)
    first = address(decoder.decode(data[0]))  # dropped at once
    assert all(address(decoder.decode(blob)) == first for blob in data[1:])
    assert len(buffers) == 1


def test_an_image_still_referenced_keeps_its_buffer() -> None:
    decoder = ImageDecoder(buffers=ImageBuffers(3))
    data = jpegs(12)
    kept = decoder.decode(data[0])
    expected = kept.copy()
    view = kept[5:20, ::2]  # a view alone, the image itself dropped
    view_expected = view.copy()
    del kept
    tensor_source = decoder.decode(data[1])
    from_buffer = memoryview(tensor_source)  # as torch.from_numpy or PIL would hold it
    source_expected = tensor_source.copy()
    del tensor_source
    for blob in data[2:] * 3:  # more images than the pool tracks, all dropped
        decoder.decode(blob)
    assert np.array_equal(view, view_expected)
    assert np.array_equal(np.asarray(from_buffer), source_expected)
    assert not np.array_equal(expected, decoder.decode(data[2]))  # a sanity check


def test_keeping_every_image_is_safe_beyond_the_pool() -> None:
    decoder = ImageDecoder(buffers=ImageBuffers(2))
    plain = ImageDecoder()
    data = jpegs(9, size=(30, 44)) + jpegs(3, size=(64, 80))
    kept = [decoder.decode(blob) for blob in data]
    assert len({address(image) for image in kept}) == len(kept)
    for image, blob in zip(kept, data, strict=True):
        assert np.array_equal(image, plain.decode(blob))


def test_a_larger_image_never_overruns_a_smaller_buffer() -> None:
    buffers = ImageBuffers(1)
    decoder = ImageDecoder(buffers=buffers)
    small, large = jpegs(1, size=(16, 16))[0], jpegs(1, size=(300, 400))[0]
    decoder.decode(small)
    image = decoder.decode(large)
    assert image.shape == (300, 400, 3)
    assert np.array_equal(image, ImageDecoder().decode(large))


def test_a_buffer_forgotten_while_in_use_is_sized_by_its_replacement() -> None:
    """With every buffer in use the pool forgets one and tracks a fresh one of the new
    size: a later, larger request must get all its bytes, not that smaller replacement."""
    buffers = ImageBuffers(1)
    kept = buffers.take(1_000_000)  # pins the only tracked buffer
    small = buffers.take(10)  # every buffer in use: the large one is forgotten
    del kept, small
    assert buffers.take(1_000_000).nbytes == 1_000_000
    assert len(buffers) == 1


def test_a_kept_image_pins_little_more_than_itself() -> None:
    """A small image must not land in a large photo's free buffer, nor in one rounded far
    past its size: a caller keeping every image (``[img for img, _ in dataset]``) would
    hold 20 to 600 times their pixels."""
    buffers = ImageBuffers(8)
    large = buffers.take(2_000_000)
    del large  # free again, and far too large for what follows
    small = buffers.take(3072)  # a 32 x 32 RGB image
    assert small.base is not None and small.base.nbytes == 4096
    medium = buffers.take(345_600)  # a 240 x 480 photo
    assert medium.base is not None and medium.base.nbytes < 345_600 * 9 // 8
    del medium
    assert buffers.take(200_000).base.nbytes < 4 * 200_000 + 4096  # reused: close enough
    assert len(buffers) == 3


@pytest.mark.timeout(60)
def test_threads_sharing_buffers_never_share_an_image() -> None:
    from concurrent.futures import ThreadPoolExecutor

    decoder = ImageDecoder(buffers=ImageBuffers(8))
    data = jpegs(16)
    expected = [ImageDecoder().decode(blob) for blob in data]

    def check(i: int) -> bool:
        image = decoder.decode(data[i % len(data)])
        held = [decoder.decode(data[(i + 1) % len(data)]) for _ in range(3)]
        same = all(np.array_equal(h, expected[(i + 1) % len(data)]) for h in held)
        return same and np.array_equal(image, expected[i % len(data)])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(400)))


def test_image_buffers_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="count"):
        ImageBuffers(0)


# -- EXIF orientation -----------------------------------------------------------------------


def with_orientation(fmt: str, orientation: int, size: tuple[int, int] = (20, 32)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options: dict[str, Any] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        options["quality"] = 92
    return encode(photo(size, index=orientation), fmt, **options)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_every_exif_orientation_shows_what_exif_transpose_shows(
    fmt: str, orientation: int, backend: str
) -> None:
    data = with_orientation(fmt, orientation)
    decoded = ImageDecoder(backend=backend).decode(data)
    expected = reference(data, "RGB")
    swapped = orientation in (5, 6, 7, 8)
    assert decoded.shape[:2] == ((32, 20) if swapped else (20, 32))
    assert max_diff(decoded, expected) <= LOSSY.get(fmt, 0)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_orientation_then_exact_resize(orientation: int) -> None:
    data = with_orientation("JPEG", orientation, size=(60, 100))
    for backend in ("auto", "pillow"):
        decoded = ImageDecoder(image_size=(16, 24), backend=backend).decode(data)
        assert decoded.shape == (16, 24, 3)
        shown = Image.fromarray(reference(data, "RGB")).resize((24, 16), Image.Resampling.BILINEAR)
        assert np.abs(decoded.astype(int) - np.asarray(shown).astype(int)).mean() < 4


def test_jpeg_orientation_reads_what_pillow_reads() -> None:
    for orientation in range(1, 9):
        data = with_orientation("JPEG", orientation)
        with Image.open(io.BytesIO(data)) as image:
            assert image.getexif().get(0x0112) == orientation
        assert jpeg_orientation(data) == orientation
    assert jpeg_orientation(SOURCES["jpeg-rgb"]()) == 1  # no EXIF at all


def app1(tiff: bytes) -> bytes:
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def tiff_ifd(order: str, entries: list[tuple[int, int, int, bytes]], ifd: int = 8) -> bytes:
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, ifd)
    head += b"\0" * (ifd - len(head))
    body = struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(order + "HHI", tag, kind, count) + value.ljust(4, b"\0")
    return head + body + b"\0\0\0\0"


def orientation_entry(order: str, value: int) -> tuple[int, int, int, bytes]:
    return 0x0112, 3, 1, struct.pack(order + "H", value)


@pytest.mark.parametrize("order", ["<", ">"])
def test_jpeg_orientation_reads_both_byte_orders(order: str) -> None:
    for value in range(1, 9):
        other = (0x010F, 2, 4, b"Cam\0")  # a tag before Orientation
        data = b"\xff\xd8" + app1(tiff_ifd(order, [other, orientation_entry(order, value)]))
        assert jpeg_orientation(data + b"\xff\xd9") == value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff",
        b"\xff\xd8" + app1(b""),
        b"\xff\xd8" + app1(b"XX\x2a\x00\x08\x00\x00\x00"),  # no byte order mark
        b"\xff\xd8" + app1(b"II\x2a\x00"),  # shorter than a TIFF header
        b"\xff\xd8" + app1(b"II\x2a\x00\xff\xff\xff\x7f"),  # IFD far past the end
        b"\xff\xd8" + app1(b"II\x2a\x00\x08\x00\x00\x00\xff\xff"),  # 65535 entries, none there
        b"\xff\xd8" + app1(tiff_ifd("<", [orientation_entry("<", 0)])),  # out of range
        b"\xff\xd8" + app1(tiff_ifd("<", [orientation_entry("<", 9)])),
        b"\xff\xd8" + app1(tiff_ifd(">", [orientation_entry(">", 65535)])),
        b"\xff\xd8\xff\xe1\xff\xff" + b"Exif\x00\x00II",  # length past the end
        b"\xff\xd8\xff\xe1\x00\x00\xff\xe1\x00\x01",  # zero and one length segments
        b"\xff\xd8\x00\x00\x00\x00",  # no marker where one must be
        b"\xff\xd8\xff\xda\x00\x04" + app1(tiff_ifd("<", [orientation_entry("<", 6)])),
    ],
    ids=[
        "empty",
        "soi-only",
        "half-marker",
        "empty-exif",
        "no-byte-order",
        "short-tiff",
        "ifd-past-end",
        "entries-missing",
        "orientation-0",
        "orientation-9",
        "orientation-65535",
        "segment-past-end",
        "tiny-segments",
        "no-marker",
        "exif-after-scan",
    ],
)
def test_malformed_exif_means_orientation_1_or_leaves_it_to_pillow(data: bytes) -> None:
    assert jpeg_orientation(data) in (1, UNKNOWN_ORIENTATION)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("kind", [1, 3, 4, 8, 9])  # BYTE, SHORT, LONG, SSHORT, SLONG
@pytest.mark.parametrize("fill", [b"", b"\xff\xff"], ids=["", "fill-bytes"])
def test_orientation_of_any_integer_type_and_after_fill_bytes_is_what_pillow_applies(
    order: str, kind: int, fill: bytes
) -> None:
    """Other tools write the tag as LONG (or another integer type) and may put 0xFF fill
    bytes before a marker: the fast path must rotate exactly where Pillow does."""
    code = {1: "B", 3: "H", 4: "I", 8: "h", 9: "i"}[kind]
    entry = (0x0112, kind, 1, struct.pack(order + code, 6))
    plain = SOURCES["jpeg-rgb"]()
    data = plain[:2] + fill + app1(tiff_ifd(order, [entry])) + plain[2:]
    applied = 1 if kind == 1 else 6  # Pillow reads a BYTE value as bytes and ignores it
    with Image.open(io.BytesIO(data)) as image:
        assert ImageOps.exif_transpose(image).size == (
            image.size[::-1] if applied == 6 else image.size
        )
    assert jpeg_orientation(data) == (UNKNOWN_ORIENTATION if kind == 1 else applied)
    decoded = ImageDecoder("RGB").decode(data)
    expected = reference(data, "RGB")
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 2


def test_xmp_before_exif_is_skipped() -> None:
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    segment = b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp
    data = b"\xff\xd8" + segment + app1(tiff_ifd("<", [orientation_entry("<", 8)]))
    assert jpeg_orientation(data) == 8


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_jpeg_orientation_never_raises(tail: bytes) -> None:
    assert 0 <= jpeg_orientation(b"\xff\xd8" + tail) <= 8
    assert 0 <= jpeg_orientation(b"\xff\xd8" + app1(tail)) <= 8


_EXIF_ENTRIES = st.lists(
    st.tuples(
        st.sampled_from([0x0112, 0x0112, 0x010F]),  # Orientation, mostly; Make
        st.integers(0, 17),  # every TIFF field type, and one past them
        st.integers(0, 3),
        st.binary(min_size=4, max_size=4),
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(["<", ">"]), _EXIF_ENTRIES)
def test_the_fast_path_reads_an_orientation_only_where_pillow_reads_the_same(
    order: str, entries: list[tuple[int, int, int, bytes]]
) -> None:
    """Whatever types, counts, values and repeats the Orientation field comes in, the
    fast path either reads what Pillow applies or leaves the image to Pillow."""
    data = b"\xff\xd8" + app1(tiff_ifd(order, entries)) + SOURCES["jpeg-rgb"]()[2:]
    fast = jpeg_orientation(data)
    if fast != UNKNOWN_ORIENTATION:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                assert fast == _pillow_orientation(image)


def _jpeg_with(segment: bytes, orientation: int | None = None) -> bytes:
    """A JPEG (with no EXIF, or EXIF ``orientation``) with ``segment`` put straight after
    its SOI marker."""
    data = SOURCES["jpeg-rgb"]() if orientation is None else with_orientation("JPEG", orientation)
    return data[:2] + segment + data[2:]


@pytest.mark.parametrize(
    "data",
    [
        _jpeg_with(b"\xff\xd0", orientation=6),  # RST0: a marker without a length
        _jpeg_with(
            b"\xff\xe1"
            + struct.pack(">H", 2 + 29 + 60)
            + b"http://ns.adobe.com/xap/1.0/\x00"
            + b'<rdf:Description tiff:Orientation="6"/>'.ljust(60)
        ),  # orientation only in XMP, which Pillow applies
        _jpeg_with(app1(tiff_ifd("<", [(0x0112, 6, 1, bytes([6]))]))),  # SBYTE
        _jpeg_with(
            app1(tiff_ifd("<", [(0x0112, 0, 1, b"\6"), (0x0112, 3, 1, b"\6\0")]))
        ),  # an entry of an unknown type, then a SHORT one
    ],
    ids=["rst-marker", "xmp-orientation", "sbyte", "unknown-type-then-short"],
)
def test_jpegs_the_fast_path_cannot_read_surely_are_rotated_as_pillow_rotates(
    data: bytes,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(data, "RGB")
        fast = ImageDecoder("RGB").decode(data)
    assert fast.shape == expected.shape
    assert max_diff(fast, expected) <= 2


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_float_orientation_rotates_as_exif_transpose_does(backend: str) -> None:
    """exif_transpose looks the value up in a dict, where 6.0 finds 6: so do we."""
    entry = (0x0112, 11, 1, struct.pack("<f", 6.0))  # FLOAT
    data = _jpeg_with(app1(tiff_ifd("<", [entry])))
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif().get(0x0112) == 6.0
        upright = ImageOps.exif_transpose(image)
    decoded = ImageDecoder("RGB", backend=backend).decode(data)
    assert decoded.shape[:2] == upright.size[::-1] != image.size[::-1]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _tiff_with_strip_offsets_typed(kind: int) -> bytes:
    data = bytearray(encode(photo((8, 6)), "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<HI", data, entry + 2, kind, 1)
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        _tiff_with_strip_offsets_typed(2),  # ASCII: a TypeError inside Pillow
        _tiff_with_strip_offsets_typed(16),  # LONG8: an OverflowError
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0))
        + _png_chunk(b"tRNS", b"\xff\xff\xff\x00")
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 20))
        + _png_chunk(b"IEND", b""),  # a palette image without a palette: AssertionError
    ],
    ids=["tiff-ascii-offsets", "tiff-long8-offsets", "png-no-palette"],
)
def test_whatever_pillow_raises_on_hostile_bytes_is_a_decompression_error(data: bytes) -> None:
    """on_error can only skip what comes as DecompressionError: a TypeError from a TIFF
    tag typed oddly used to end the whole iteration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DecompressionError, match="cannot decode image"):
            ImageDecoder("RGB").decode(data)


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_gray_from_a_colour_jpeg_is_pillows_convert_l_even_on_saturated_colours(
    backend: str,
) -> None:
    """libjpeg's own gray output is the Y channel: up to ~27 levels from Pillow's L on
    pure reds and blues. Both backends give exactly what Pillow's convert("L") gives."""
    rng = np.random.default_rng(1)
    primaries = np.array(
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
        np.uint8,
    )
    blocks = primaries[rng.integers(0, 6, (16, 16))].repeat(4, 0).repeat(4, 1)
    data = encode(Image.fromarray(blocks), "JPEG", quality=90)
    for size in (None, (16, 16), (50, 40)):
        decoder = ImageDecoder("L", size, backend=backend)
        with Image.open(io.BytesIO(data)) as image:
            expected = image.convert("L")
            if size is not None:
                expected = expected.resize(size[::-1], Image.Resampling.BILINEAR)
        decoded = decoder.decode(data)
        assert decoded.shape == (*np.asarray(expected).shape, 1)
        if size is None:
            assert max_diff(decoded[:, :, 0], np.asarray(expected)) == 0


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_jpeg_with_broken_exif_still_decodes_unrotated(backend: str) -> None:
    plain = SOURCES["jpeg-rgb"]()
    broken = plain[:2] + app1(b"II\x2a\x00\xff\xff\xff\x7f") + plain[2:]
    decoded = ImageDecoder(backend=backend).decode(broken)
    assert max_diff(decoded, ImageDecoder(backend=backend).decode(plain)) == 0


# -- resizing with a DCT-domain pre-scale -----------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    """A 1600 x 1200 photo-like JPEG: eight times the target below on each side."""
    return encode(photo((1200, 1600), index=4), "JPEG", quality=90)


def pillow_full_resize(data: bytes, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(image)


def test_pillow_path_prescales_in_the_dct_domain_and_gives_the_exact_shape(
    large_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    scales: list[Any] = []
    original = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: Any, size: Any) -> Any:
        result = original(self, mode, size)
        scales.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    decoded = ImageDecoder(image_size=(150, 200), backend="pillow").decode(large_jpeg)
    assert decoded.shape == (150, 200, 3)
    # draft() picked a 1/8 scale: 200 x 150 pixels were decoded, not 1600 x 1200.
    assert scales == [((200, 150), (200, 150))]
    expected = pillow_full_resize(large_jpeg, (150, 200))
    diff = np.abs(decoded.astype(int) - expected.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 24


def test_simplejpeg_path_prescales_in_the_dct_domain_and_gives_the_exact_shape(
    large_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = simplejpeg.decode_jpeg

    def spy(data: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(data, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    decoder = ImageDecoder(image_size=(120, 170))
    assert decoder.backend == "simplejpeg"
    decoded = decoder.decode(large_jpeg)
    assert decoded.shape == (120, 170, 3)
    assert calls and calls[0]["min_height"] == 150 and calls[0]["min_width"] == 200  # 1/8
    expected = pillow_full_resize(large_jpeg, (120, 170))
    diff = np.abs(decoded.astype(int) - expected.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 24


@pytest.mark.parametrize("size", [(1, 1), (7, 300), (1200, 1600), (2000, 100)])
@pytest.mark.parametrize("mode", MODES)
def test_any_target_size_is_met_exactly(
    large_jpeg: bytes, size: tuple[int, int], mode: str
) -> None:
    for backend in ("auto", "pillow"):
        decoded = ImageDecoder(mode, image_size=size, backend=backend).decode(large_jpeg)
        assert decoded.shape == (*size, CHANNELS[mode])


def test_resizing_a_png_matches_pillow_exactly() -> None:
    data = SOURCES["png-rgba"]()
    decoded = ImageDecoder("RGBA", image_size=(10, 14)).decode(data)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.convert("RGBA").resize((14, 10), Image.Resampling.BILINEAR))
    assert max_diff(decoded, expected) == 0


# -- simplejpeg against Pillow --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(
    ("size", "target"),
    [
        ((400, 300), (224, 224)),  # a little larger: libjpeg alone would scale by 6/8
        ((400, 300), (256, 256)),
        ((1000, 700), (224, 224)),  # 1/2 on both
        ((1000, 700), (60, 80)),  # 1/8
        ((48, 32), (20, 30)),
        ((5, 3), (1, 1)),
    ],
)
def test_simplejpeg_and_pillow_resize_alike(
    size: tuple[int, int], target: tuple[int, int], mode: str
) -> None:
    """Both scale in the DCT domain by the same power of two (Pillow's draft), so a resized
    JPEG is the same whether the fast extra is installed or not."""
    data = encode(photo(size, index=3), "JPEG", quality=90)
    fast = ImageDecoder(mode, image_size=target)
    slow = ImageDecoder(mode, image_size=target, backend="pillow")
    assert (fast.backend, slow.backend) == ("simplejpeg", "pillow")
    assert max_diff(fast.decode(data), slow.decode(data)) <= 2


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("index", range(6))
def test_simplejpeg_and_pillow_agree_on_plain_jpegs(mode: str, index: int) -> None:
    size = [(36, 52), (64, 48), (17, 23), (128, 96), (8, 8), (250, 333)][index]
    quality = [95, 90, 75, 60, 100, 85][index]
    data = encode(photo(size, index=index), "JPEG", quality=quality)
    fast = ImageDecoder(mode)
    slow = ImageDecoder(mode, backend="pillow")
    assert (fast.backend, slow.backend) == ("simplejpeg", "pillow")
    assert max_diff(fast.decode(data), slow.decode(data)) <= 2


# -- decompression bombs --------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` RGB, with a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(SOURCES["jpeg-rgb"]())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(SOURCES["gif"]())
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


@pytest.mark.parametrize("backend", ["auto", "pillow"])
@pytest.mark.parametrize(
    "bomb",
    [png_claiming(100_000, 100_000), jpeg_claiming(65_000, 65_000), gif_claiming(65_535, 65_535)],
    ids=["png", "jpeg", "gif"],
)
def test_a_header_claiming_huge_dimensions_is_refused_naming_the_limit(
    bomb: bytes, backend: str
) -> None:
    with pytest.raises(DecompressionError, match=r"limit of 178,956,970") as info:
        ImageDecoder(backend=backend).decode(bomb)
    assert "raise pixcrawler.config.MAX_IMAGE_PIXELS" in str(info.value)  # not Pillow's words


@pytest.mark.parametrize("backend", ["auto", "pillow"])
@pytest.mark.parametrize("source", ["jpeg-rgb", "png-rgb", "gif", "webp-lossy", "tiff"])
def test_max_pixels_is_the_configurable_limit(source: str, backend: str) -> None:
    data = SOURCES[source]()  # 36 x 52 = 1,872 pixels
    assert ImageDecoder(max_pixels=1_872, backend=backend).decode(data).shape[:2] == (36, 52)
    with pytest.raises(DecompressionError, match=r"52x36 = 1,872 pixels.*limit of 1,871") as info:
        ImageDecoder(max_pixels=1_871, backend=backend).decode(data)
    assert "pixcrawler.config.MAX_IMAGE_PIXELS" in str(info.value)


def test_between_pillows_warning_and_its_error_max_pixels_decides() -> None:
    # 100 M pixels: past Pillow's DecompressionBombWarning (shown, as to any Pillow user),
    # short of its error. The decoder's own limit decides.
    bomb = png_claiming(10_000, 10_000)
    bombs = Image.DecompressionBombWarning
    with pytest.warns(bombs), pytest.raises(DecompressionError, match="limit of 50,000,000"):
        ImageDecoder(max_pixels=50_000_000).decode(bomb)
    with pytest.warns(bombs), pytest.raises(DecompressionError, match=r"truncated|broken"):
        ImageDecoder().decode(bomb)  # allowed by the default limit; its data is missing


@pytest.mark.parametrize("source", ["png-rgb", "gif", "tiff", "webp-lossy", "jpeg-cmyk"])
def test_a_limit_raised_past_pillows_own_lets_pillow_open_the_image(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow refuses past twice its Image.MAX_IMAGE_PIXELS: a decoder allowed more raises
    it to match (never lowers it), so raising config.MAX_IMAGE_PIXELS works for every
    format, not only for the JPEGs simplejpeg reads."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses past 1,000
    data = SOURCES[source]()  # 1,872 pixels
    assert ImageDecoder(max_pixels=5_000).decode(data).shape[:2] == (36, 52)
    assert Image.MAX_IMAGE_PIXELS == 2_500
    ImageDecoder(max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == 2_500


def test_decoding_never_swaps_the_processs_warning_filters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """warnings.catch_warnings() saves and restores the filters of the whole process: two
    decode threads doing so at once lose the caller's filters or leak their own."""
    callers: list[str] = []
    real = warnings.catch_warnings

    def spy(*args: Any, **kwargs: Any) -> Any:
        callers.append(sys._getframe(1).f_globals.get("__name__", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(warnings, "catch_warnings", spy)
    for source in SOURCES:
        for backend in ("auto", "pillow"):
            ImageDecoder(backend=backend).decode(SOURCES[source]())
    monkeypatch.undo()
    assert not [name for name in callers if name.startswith("pixcrawler")]


def test_16_bit_gray_keeps_its_high_byte() -> None:
    """convert() clips 16-bit gray at 255 (an almost white image); 16-bit RGB keeps the
    high byte, and so does 16-bit gray here."""
    ramp = np.repeat((np.arange(8, dtype=np.uint16) * 9362)[np.newaxis, :], 4, axis=0)
    expected = (ramp >> 8).astype(np.uint8)
    for fmt in ("PNG", "TIFF"):
        data = encode(Image.fromarray(ramp), fmt)
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode.startswith("I;16")
        for mode in MODES:
            decoded = ImageDecoder(mode).decode(data)
            reference_image = Image.fromarray(expected, "L").convert(mode)
            wanted = np.asarray(reference_image).reshape(4, 8, CHANNELS[mode])
            assert max_diff(decoded, wanted) == 0, (fmt, mode)
        resized = ImageDecoder("L", image_size=(2, 4)).decode(data)
        assert (
            max_diff(
                resized[:, :, 0],
                np.asarray(Image.fromarray(expected).resize((4, 2), Image.Resampling.BILINEAR)),
            )
            == 0
        )


def _keyed_png(bit_depth: int, color_type: int, rows: list[bytes], key: bytes) -> bytes:
    """A PNG of ``rows`` (each unfiltered) whose tRNS chunk names one transparent level or
    colour (``key``), as Pillow cannot write one below 8 or at 16 bits."""
    width = len(rows[0]) * 8 // (bit_depth * (3 if color_type == 2 else 1))
    header = struct.pack(">IIBBBBB", width, len(rows), bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"tRNS", key)
        + _png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "grey", "transparent"),
    [
        # 1-bit grey 0, 1, 0, 1, 0, 1, 0, 1, the key 1 (Pillow before 13 kept it as 1)
        (_keyed_png(1, 0, [bytes([0b0101_0101])], struct.pack(">H", 1)), True, [1, 3, 5, 7]),
        # 2-bit grey 0, 1, 2, 3 (Pillow gives 0, 85, 170, 255), the key 1
        (_keyed_png(2, 0, [bytes([0b00_01_10_11])], struct.pack(">H", 1)), True, [1]),
        # 4-bit grey 0, 5, 10, 15 (0, 85, 170, 255), the key 5
        (_keyed_png(4, 0, [bytes([0x05, 0xAF])], struct.pack(">H", 5)), True, [1]),
        # 16-bit grey 0, 300, 65535, 257: the key 300; 257 shares its high byte (1)
        (_keyed_png(16, 0, [struct.pack(">4H", 0, 300, 65535, 257)], b"\x01\x2c"), True, [1]),
        # 16-bit RGB: the key (100, 100, 100); black shares its high bytes (0, 0, 0)
        (
            _keyed_png(
                16, 2, [struct.pack(">9H", 0, 0, 0, 100, 100, 100, 60000, 0, 0)], b"\0d" * 3
            ),
            False,
            [1],
        ),
        # 16-bit RGB keyed black: (100, 100, 100), whose high bytes are black's, stays
        (
            _keyed_png(16, 2, [struct.pack(">6H", 0, 0, 0, 100, 100, 100)], b"\0\0" * 3),
            False,
            [0],
        ),
    ],
    ids=["grey-1-bit", "grey-2-bit", "grey-4-bit", "grey-16-bit", "rgb-16-bit", "rgb-16-bit-black"],
)
@pytest.mark.parametrize("tiles", ["pillow", "plain-tuples"])
def test_a_png_colour_key_is_applied_exactly_as_alpha(
    data: bytes, grey: bool, transparent: list[int], tiles: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow compares a tRNS key with its 8-bit pixels: a 2- or 4-bit grey key (a sample
    value, never scaled up) and a 16-bit one (against pixels cut to their high byte) made
    every pixel opaque, or a near one transparent. RGBA carries the key exactly; the
    colours are the ones RGB gives. Pillow before 11 gives its tiles as plain tuples (the
    first version of this read them by name, and every PNG failed there)."""
    if tiles == "plain-tuples":
        from PIL import PngImagePlugin

        opened = PngImagePlugin.PngImageFile._open

        def plain(self: PngImagePlugin.PngImageFile) -> None:
            opened(self)
            self.tile = [tuple(tile) for tile in self.tile]  # type: ignore[misc]

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", plain)
        assert ImageDecoder().decode(encode(photo(), "PNG")).shape[2] == 3
    rgb = ImageDecoder("RGB").decode(data)
    rgba = ImageDecoder("RGBA").decode(data)
    assert (rgba[..., :3] == rgb).all()
    alpha = rgba[0, :, 3].tolist()
    assert alpha == [0 if x in transparent else 255 for x in range(len(alpha))]
    if grey:
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        assert ImageDecoder("L").decode(data)[..., 0].tolist() == rgb[..., 0].tolist()


# -- corrupt, truncated and foreign bytes ---------------------------------------------------


def test_what_libjpeg_only_warns_about_decodes_with_either_backend() -> None:
    """simplejpeg is strict about libjpeg's warnings, Pillow is not: the fast extra must not
    refuse an image that a plain install decodes (here, stray bytes before the EOI marker)."""
    noise = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    stray = data[:-2] + b"\x00\x11\x22" + data[-2:]
    with pytest.raises(ValueError, match="extraneous bytes"):
        simplejpeg.decode_jpeg(stray)
    expected = reference(data, "RGB")
    for backend in ("auto", "pillow"):
        assert np.array_equal(ImageDecoder(backend=backend).decode(stray), expected)


@pytest.mark.parametrize("backend", ["auto", "pillow"])
@pytest.mark.parametrize("source", ["jpeg-rgb", "jpeg-progressive", "png-rgb", "png-palette"])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_a_truncated_image_is_refused(source: str, keep: float, backend: str) -> None:
    data = SOURCES[source]()
    with pytest.raises(DecompressionError, match="cannot decode image"):
        ImageDecoder(backend=backend).decode(data[: int(len(data) * keep)])


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_png_with_a_damaged_chunk_is_refused(backend: str) -> None:
    data = bytearray(SOURCES["png-rgb"]())
    idat = data.find(b"IDAT")
    data[idat + 20] ^= 0xFF  # the chunk CRC no longer matches
    with pytest.raises(DecompressionError):
        ImageDecoder(backend=backend).decode(bytes(data))


def damaged_png_pixels() -> tuple[np.ndarray, bytes, list[bytes]]:
    """A compressible PNG, its pixels, and every copy of it with one byte of its pixel data
    (IDAT, CRC left as it was) flipped."""
    ramp = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    pixels = np.dstack([ramp, ramp.T, ramp // 2])
    data = encode(Image.fromarray(pixels), "PNG")
    at = data.find(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    damaged = []
    for offset in range(at + 4, at + 4 + length):
        copy = bytearray(data)
        copy[offset] ^= 0x10
        damaged.append(bytes(copy))
    return pixels, data, damaged


def test_a_png_whose_pixel_data_is_damaged_never_decodes_to_wrong_pixels() -> None:
    """Pillow checks neither IDAT's CRC nor, when the rows end first, zlib's checksum: a
    third of these flips decoded to other pixels with on_error="raise"."""
    pixels, data, damaged = damaged_png_pixels()
    assert np.array_equal(ImageDecoder().decode(data), pixels)
    silent = 0
    for copy in damaged:
        with contextlib.suppress(Exception), Image.open(io.BytesIO(copy)) as image:
            silent += not np.array_equal(np.asarray(image.convert("RGB")), pixels)
        with pytest.raises(DecompressionError, match=r"PNG chunk 'IDAT' at byte \d+ fails"):
            ImageDecoder().decode(copy)
    assert silent > 0  # (what Pillow alone lets through)


def test_a_png_with_a_bad_crc_in_an_ancillary_chunk_after_its_pixels_still_decodes() -> None:
    """A tEXt a metadata tool rewrote without its CRC: the pixels are whole (libpng warns
    and drops such a chunk)."""
    pixels, data, _ = damaged_png_pixels()
    body = b"Comment\0rewritten"
    text = struct.pack(">I", len(body)) + b"tEXt" + body + b"\0\0\0\0"  # a wrong CRC
    at = data.rfind(b"IEND") - 4
    assert np.array_equal(ImageDecoder().decode(data[:at] + text + data[at:]), pixels)


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_a_jpeg_with_a_damaged_header_is_refused(backend: str) -> None:
    data = bytearray(SOURCES["jpeg-rgb"]())
    dqt = data.find(b"\xff\xdb")
    data[dqt + 2 : dqt + 4] = b"\x00\x01"  # a quantisation table length of 1
    with pytest.raises(DecompressionError):
        ImageDecoder(backend=backend).decode(bytes(data))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"not an image", b"\0" * 100],
    ids=["empty", "soi", "png-magic", "gif-magic", "text", "zeros"],
)
@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_bytes_that_are_no_image_are_refused(data: bytes, backend: str) -> None:
    with pytest.raises(DecompressionError, match="cannot decode image"):
        ImageDecoder(backend=backend).decode(data)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX", "SGI", "DDS"])
def test_formats_a_chunk_never_holds_are_refused(fmt: str) -> None:
    data = encode(photo((16, 16)), fmt)
    with pytest.raises(
        DecompressionError, match="not a BMP, GIF, JPEG, PNG, TIFF, WEBP image"
    ) as e:
        ImageDecoder().decode(data)
    assert "BytesIO" not in str(e.value)  # Pillow's own text names its file object


def test_an_eps_member_never_starts_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    def ghostscript(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Ghostscript was started on a chunk member")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(DecompressionError, match="not a BMP, GIF, JPEG, PNG, TIFF, WEBP image"):
        ImageDecoder().decode(eps)


FUZZ_FORMATS = {
    "jpeg": lambda: encode(photo((24, 24)), "JPEG", quality=80),
    "png": lambda: encode(photo((24, 24), mode="P"), "PNG"),
    "gif": lambda: encode(photo((24, 24), mode="P"), "GIF"),
    "bmp": lambda: encode(photo((12, 12)), "BMP"),
    "tiff": lambda: encode(photo((12, 12)), "TIFF"),
    "webp": lambda: encode(photo((24, 24)), "WEBP"),
}
FUZZ_BASES = {name: make() for name, make in FUZZ_FORMATS.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on what it skipped
@settings(
    max_examples=int(os.environ.get("PIXCRAWLER_FUZZ_EXAMPLES", 400)),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.sampled_from(sorted(FUZZ_BASES)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
    st.sampled_from(["auto", "pillow"]),
    st.sampled_from(MODES),
)
def test_damaged_images_decode_or_raise_a_decompression_error(
    name: str, edits: list[tuple[int, int]], cut: int, backend: str, mode: str
) -> None:
    data = bytearray(FUZZ_BASES[name])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: max(1, len(data) - cut % len(data))]
    try:
        array = ImageDecoder(mode, backend=backend, max_pixels=1 << 22).decode(bytes(data))
    except DecompressionError:
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == CHANNELS[mode]
