"""Encoded image bytes → HWC ``uint8`` arrays, the same pixels whichever decoder runs.

Pillow is the reference and the fallback. When the ``fast`` extra (simplejpeg, a
libjpeg-turbo binding) is installed, plain JPEGs take it: about twice Pillow's speed, and,
like Pillow, it releases the GIL, so a thread pool scales with cores. simplejpeg does not
apply EXIF orientation or read CMYK, so those images go to Pillow. With ``image_size`` a
JPEG is first scaled in the DCT domain to at least the target (by the power of two
Pillow's ``draft`` picks, whichever decoder runs), then resized exactly.
"""

from __future__ import annotations

import functools
import io
import operator
import re
import struct
import sys
import threading
import zlib
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile
from PIL.TiffImagePlugin import TiffImageFile

from . import config
from .exceptions import DecompressionError

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_TILE_WIDTH, _TILE_LENGTH = 322, 323  # TIFF tags
_MIN_FAST_SCALED = 8  # a JPEG this many pixels a side or more may be scaled by simplejpeg
# A tile any image may have, whatever its own size (GDAL and ImageMagick write 1024x1024
# ones; 48 MiB of RGB at most): past it, a tile must not exceed 4 times the image.
_MAX_SMALL_TILE = 4096 * 4096
# Start-of-frame markers of progressive JPEGs (Huffman and arithmetic coded).
_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# The formats a chunk holds (see the design's "Chunk archive"). Pillow tries every plugin
# it has otherwise: a hostile member could reach EPS (which runs Ghostscript) or any of
# dozens of rarely used parsers.
_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
_SIMPLEJPEG_SPACES = {"RGB": "RGB", "L": "GRAY"}
_CHANNELS = {"RGB": 3, "L": 1, "RGBA": 4}


def unsupported_mode(image: Image.Image) -> bool:
    """Whether Pillow opens ``image`` in a mode it does not convert right, so that no image
    is better than the one it would give (the packer leaves such images out): LAB to RGB
    gives other colours (to L it refuses); 32-bit integer and float grey (TIFF) are clipped
    to 0..255, a ramp becoming black and white (signed 16-bit opens as 32-bit). A 16-bit
    grey PNG, which older Pillows open as 32-bit, is not: its high byte is kept."""
    return image.mode in ("LAB", "F") or (image.mode == "I" and image.format != "PNG")


class ImageBuffers:
    """Output memory for decoded images, reused once nothing references it any more.

    A fresh array per image costs more than it looks: malloc hands a few hundred KB back to
    the OS when it is freed, and the next image faults every page in again (about 90 page
    faults and a third of the decode time per photo when a batch of 64 is alive at once).
    Images decode into buffers kept here instead. A buffer is free again when its reference
    count says that nothing but this pool holds it: every view, slice, ``torch.from_numpy``
    tensor or PIL image made from an image references its buffer, so one that is still in
    use is never handed out. Images the caller keeps simply pin their buffers, and the pool
    allocates others (it tracks at most ``count``).
    """

    def __init__(self, count: int = config.IMAGE_BUFFERS) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.count = count
        self._buffers: list[np.ndarray] = []
        self._sizes: list[int] = []  # each buffer's nbytes, read without touching the array
        self._next = 0  # the tracked buffer to forget next when every one is in use
        self._lock = threading.Lock()
        self._free_refs = self._refs([np.empty(1, np.uint8)])[0]  # "only the pool holds it"

    @staticmethod
    def _refs(buffers: list[np.ndarray]) -> list[int]:
        """Every buffer's reference count, each read the same way (so comparable)."""
        return [sys.getrefcount(buffer) for buffer in buffers]

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` that nothing else references.

        A free buffer serves an image up to four times smaller than itself, no smaller: an
        image the caller keeps pins its whole buffer, so a small image must not land in a
        large photo's (nor in a buffer rounded far past its size). Photos of one dataset
        (a few hundred pixels a side) still share every buffer.
        """
        with self._lock:
            buffers, sizes, free = self._buffers, self._sizes, self._free_refs
            most = 4 * nbytes + _MIN_GRANULE
            best = spare = -1  # the smallest free buffer that fits; a free one to replace
            for i, refs in enumerate(self._refs(buffers)):
                if refs != free:
                    continue
                size = sizes[i]
                if nbytes <= size <= most:
                    if best < 0 or size < sizes[best]:
                        best = i
                elif spare < 0 or size < sizes[spare]:
                    spare = i
            if best >= 0:
                return buffers[best][:nbytes]
            fresh = np.empty(_rounded(nbytes), np.uint8)
            if len(buffers) < self.count:
                buffers.append(fresh)
                sizes.append(fresh.nbytes)
                return fresh[:nbytes]
            if spare >= 0:  # a free buffer of another size: give its memory back
                slot = spare
            else:  # every buffer is in use: forget one (its holder owns it now)
                slot = self._next
                self._next = (self._next + 1) % self.count
            buffers[slot] = fresh
            sizes[slot] = fresh.nbytes
            return fresh[:nbytes]

    def forget(self) -> None:
        """Hold no buffer any more (images handed out keep theirs)."""
        with self._lock:
            self._buffers, self._sizes, self._next = [], [], 0

    def __len__(self) -> int:
        return len(self._buffers)


_MIN_GRANULE = 4 << 10


def _rounded(nbytes: int) -> int:
    """A buffer's size for an image of ``nbytes``: rounded up by less than an eighth (and
    to whole pages), so that images of similar sizes share buffers, and a kept image pins
    little more than itself."""
    granule = max(_MIN_GRANULE, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // granule) * granule


@functools.cache
def import_decoders() -> None:
    """Import every module decoding an image would import on first use (Pillow's plugins
    and what they import, ~30 ms once per process). A module being imported holds its
    import lock, and a process forked meanwhile (a DataLoader starting its workers while
    another thread decodes its first image) inherits the lock held, and hangs on it for
    ever. So :func:`~pixcrawler.load_dataset` calls this (as does a ``Dataset``
    unpickled in another process), and reading afterwards imports nothing."""
    Image.preinit()
    Image.init()
    _load_simplejpeg()


@functools.cache  # (absent, it is not looked for again: a failed import takes its lock too)
def _load_simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


class ImageDecoder:
    """Decodes one image at a time; safe to share between threads.

    Args:
        mode: ``"RGB"`` (default), ``"L"`` or ``"RGBA"``, converted as Pillow's ``convert``.
        image_size: ``(H, W)`` to resize every image to exactly, or None to keep sizes.
        max_pixels: images whose header claims more pixels are refused (decompression bomb);
            None: ``pixcrawler.config.MAX_IMAGE_PIXELS`` as it is when the decoder is made.
        backend: ``"auto"`` (simplejpeg for JPEGs when installed), ``"pillow"``.
        buffers: decode into these reusable buffers (JPEGs at their own size, for now)
            rather than a fresh array per image; see :class:`ImageBuffers`.
    """

    def __init__(
        self,
        mode: str = "RGB",
        image_size: tuple[int, int] | None = None,
        *,
        max_pixels: int | None = None,
        backend: str = "auto",
        buffers: ImageBuffers | None = None,
    ) -> None:
        if mode not in _CHANNELS:
            raise ValueError(f"mode must be one of {', '.join(_CHANNELS)}, got {mode!r}")
        limit = config.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        if image_size is not None:
            image_size = validate_image_size(image_size, max_pixels=limit)
        if backend not in ("auto", "pillow"):
            raise ValueError(f"backend must be 'auto' or 'pillow', got {backend!r}")
        self.mode = mode
        self.channels = _CHANNELS[mode]
        self.image_size = image_size
        # Read per decoder, so `pixcrawler.config.MAX_IMAGE_PIXELS = ...` reaches the ones
        # a Dataset makes.
        self.max_pixels = limit
        _allow_in_pillow(self.max_pixels)
        self._simplejpeg = _load_simplejpeg() if backend == "auto" else None
        self._space = _SIMPLEJPEG_SPACES.get(mode)
        self.buffers = buffers

    @property
    def backend(self) -> str:
        return "simplejpeg" if self._simplejpeg is not None and self._space else "pillow"

    def decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """An ``(H, W, C)`` uint8 array; :class:`DecompressionError` if it cannot be decoded."""
        try:
            if self._space and self._simplejpeg is not None and data[:2] == b"\xff\xd8":
                try:
                    array = self._decode_jpeg(data)
                except DecompressionError:
                    raise
                except ValueError:
                    # simplejpeg refuses what libjpeg only warns about (extraneous bytes
                    # before a marker); Pillow accepts that and refuses a truncated image.
                    # Pillow decides, so every install sees the same images.
                    array = None
                if array is not None:
                    return array
            return self._decode_pillow(data)
        except (DecompressionError, MemoryError):
            raise
        except Exception as exc:
            # Pillow's parsers raise more than OSError and ValueError on hostile bytes
            # (TypeError, OverflowError, IndexError, AssertionError from TIFF tags typed
            # oddly or a PNG's stray chunks): every one is this image's fault, and on_error
            # must be able to skip it.
            if isinstance(exc, UnidentifiedImageError):  # its text names a BytesIO object
                known = ", ".join(_FORMATS)
                raise DecompressionError(f"cannot decode image: not a {known} image") from exc
            why = str(exc) or type(exc).__name__
            raise DecompressionError(f"cannot decode image: {why}") from exc

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise DecompressionError(
                self._too_many(f"{width}x{height} = {width * height:,} pixels")
            )

    def _too_many(self, claims: str) -> str:
        return (
            f"image claims {claims}, over the limit of {self.max_pixels:,} (a decompression "
            "bomb?); raise pixcrawler.config.MAX_IMAGE_PIXELS to allow it"
        )

    def _decode_jpeg(self, data: bytes | bytearray | memoryview) -> np.ndarray | None:
        sj: Any = self._simplejpeg
        height, width, space, _ = sj.decode_jpeg_header(data)
        orientation, progressive = _jpeg_header(data)
        if space not in ("RGB", "YCbCr", "Gray") or orientation != 1:
            return None  # CMYK/YCCK, rotated or possibly so: Pillow handles those
        self._check_pixels(width, height)
        if progressive:
            _check_scans(data)
        if self.image_size is not None and min(height, width) < _MIN_FAST_SCALED:
            # Scaled, an image of a few pixels comes out of simplejpeg other than out of
            # Pillow (for 3x3 to 1x1 it takes 3/8 where Pillow's draft takes 1/2; 5x5 to
            # 1x1 differs at one scale too): Pillow decodes these.
            return None
        if self.mode == "L" and space != "Gray":
            # libjpeg's gray is the Y channel, off by up to ~27 levels from Pillow's
            # convert("L") on saturated colours: decode RGB and convert it as Pillow does.
            return self._decode_jpeg_as_gray(data, height, width)
        if self.image_size is None:
            out = None
            if self.buffers is not None:
                out = self.buffers.take(height * width * self.channels)
            array: np.ndarray = sj.decode_jpeg(data, colorspace=self._space, buffer=out)
            return array
        th, tw = self.image_size
        mh, mw = _drafted(height, width, self.image_size)
        array = sj.decode_jpeg(data, colorspace=self._space, min_height=mh, min_width=mw)
        if array.shape[:2] == (th, tw):
            return array
        return self._resize_array(array)

    def _decode_jpeg_as_gray(
        self, data: bytes | bytearray | memoryview, height: int, width: int
    ) -> np.ndarray:
        """``height`` x ``width``: the size its header gives (read by the caller)."""
        sj: Any = self._simplejpeg
        if self.image_size is None:
            rgb = sj.decode_jpeg(data, colorspace="RGB")
        else:
            mh, mw = _drafted(height, width, self.image_size)
            rgb = sj.decode_jpeg(data, colorspace="RGB", min_height=mh, min_width=mw)
        gray = np.array(Image.fromarray(rgb).convert("L"))[:, :, np.newaxis]
        if self.image_size is None or gray.shape[:2] == self.image_size:
            return gray
        return self._resize_array(gray)

    def _resize_array(self, array: np.ndarray) -> np.ndarray:
        th, tw = self.image_size or array.shape[:2]
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        resized = np.array(image.resize((tw, th), Image.Resampling.BILINEAR))
        return resized.reshape(th, tw, self.channels)

    def _decode_pillow(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        # (Pillow warns of an image past Image.MAX_IMAGE_PIXELS, 89 million pixels by
        # default, and refuses one past twice that: max_pixels decides, checked below. No
        # warnings.catch_warnings() to silence it: that swaps the process's filters in
        # and out, which decode threads would do at once, losing the caller's filters.)
        try:
            image: Image.Image = Image.open(io.BytesIO(data), formats=_FORMATS)
        except Image.DecompressionBombError as exc:  # its limit is max_pixels: in our words
            found = re.search(r"\((\d{1,30}) pixels\)", str(exc))
            claims = f"{int(found[1]):,} pixels" if found else "more pixels than that"
            raise DecompressionError(self._too_many(claims)) from exc
        width, height = image.size
        self._check_pixels(width, height)
        check_opened(image, data)
        if self.image_size is not None and isinstance(image, JpegImageFile):
            th, tw = self.image_size
            # A JPEG's EXIF is read at open: asking for it here decodes nothing.
            swaps = _pillow_orientation(image) in _SWAPS_AXES
            image.draft(image.mode, (th, tw) if swaps else (tw, th))
        rawmode = _png_rawmode(image)
        # Load first: a PNG's getexif() loads the image itself, _pillow_orientation
        # swallows errors, and a second load() is a no-op, so a corrupt image would pass.
        image.load()
        if unsupported_mode(image):
            raise DecompressionError(
                f"cannot decode image: {image.format} {image.mode} images are not supported "
                "(Pillow cannot convert them to 8 bits)"
            )
        orientation = _pillow_orientation(image)
        if self.mode == "RGBA" and rawmode is not None and "transparency" in image.info:
            image = _colour_keyed(image, rawmode, data)
        sixteen_bit_gray = image.mode.startswith("I;16") or (
            image.mode == "I" and image.format == "PNG"  # (as older Pillows read them)
        )
        if orientation in _TRANSPOSE:
            image = image.transpose(_TRANSPOSE[orientation])
        if sixteen_bit_gray:
            # convert() would clip every value above 255 to white. Keep the high byte, as
            # Pillow does for 16-bit RGB.
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
        if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
            # An alpha per palette entry (pngquant's PNG-8s): Pillow warns converting it
            # to anything but RGBA. Through RGBA, the colours are the same.
            image = image.convert("RGBA")
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.image_size is not None and image.size != self.image_size[::-1]:
            th, tw = self.image_size
            image = image.resize((tw, th), Image.Resampling.BILINEAR)
        array = np.array(image)
        return array.reshape(array.shape[0], array.shape[1], self.channels)


def _png_rawmode(image: Image.Image) -> str | None:
    """How a PNG's samples are stored (``"L;4"``, ``"I;16B"``, ``"RGB;16B"``…), read before
    ``load()`` empties the tile; None for any other format."""
    tiles = getattr(image, "tile", None) if image.format == "PNG" else None
    # By position: a tile is a named tuple from Pillow 11, a plain one before.
    if not tiles or len(tiles[0]) < 4 or not isinstance(tiles[0][3], str):
        return None
    rawmode: str = tiles[0][3]
    return rawmode


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    """``tile`` unpacking its samples as ``rawmode``, of the type Pillow gave it."""
    fields = (*tuple(tile)[:3], rawmode)
    return type(tile)._make(fields) if hasattr(tile, "_make") else fields


# Grey samples of fewer than 8 bits, as Pillow scales them up to 0..255.
_LOW_BIT_GRAY_SCALE = {"L;2": 255 // 3, "L;4": 255 // 15}


def _colour_keyed(
    image: Image.Image, rawmode: str, data: bytes | bytearray | memoryview
) -> Image.Image:
    """A loaded PNG whose tRNS chunk names one transparent grey level or colour, with that
    key applied exactly as RGBA: Pillow compares the key with its 8-bit pixels, so a 2- or
    4-bit grey key (a sample value, never scaled) and a 16-bit one (a 16-bit value, against
    pixels cut to their high byte) became opaque everywhere, or transparent wherever the
    high byte happened to equal the key; before Pillow 13, a 1-bit key of 1 (white) never
    met the pixels' 255. Other images (palette, 8-bit keys) are returned as they are:
    Pillow's convert() gets them right."""
    key = image.info["transparency"]
    if image.mode == "1" and isinstance(key, int):  # Pillow before 13 kept the bit (0 or 1)
        image.info["transparency"] = 255 if key else 0
        return image
    if image.mode == "L" and rawmode in _LOW_BIT_GRAY_SCALE and isinstance(key, int):
        image.info["transparency"] = key * _LOW_BIT_GRAY_SCALE[rawmode]
        return image
    if image.mode in ("I;16", "I;16B", "I") and isinstance(key, int):
        samples = np.asarray(image)
        gray = (samples >> 8).astype(np.uint8)
        opaque = samples != key
        return Image.fromarray(np.dstack([gray, gray, gray, opaque * np.uint8(255)]), "RGBA")
    if image.mode == "RGB" and rawmode == "RGB;16B" and isinstance(key, tuple):
        # Pillow keeps each 16-bit sample's high byte; a second decode of the same rows
        # unpacked as little-endian keeps the low one.
        low = Image.open(io.BytesIO(data), formats=("PNG",))
        low.tile = [_with_rawmode(tile, "RGB;16L") for tile in low.tile]
        low.load()
        high = np.asarray(image)
        samples = (high.astype(np.uint16) << 8) | np.asarray(low)
        opaque = (samples != np.array(key, dtype=np.uint16)).any(axis=2)
        return Image.fromarray(np.dstack([high, opaque * np.uint8(255)]), "RGBA")
    return image


def check_opened(image: Image.Image, data: bytes | bytearray | memoryview) -> None:
    """Refuse an opened image, before it is loaded, whose decode would cost far more than
    its size says (on top of the pixel limit), or a PNG damaged where Pillow does not look:
    :class:`DecompressionError`."""
    if isinstance(image, JpegImageFile) and image.info.get("progressive"):
        _check_scans(data)
    elif isinstance(image, TiffImageFile):
        _check_tiles(image)
    elif image.format == "PNG":
        _check_png_crcs(data)


def _check_png_crcs(data: bytes | bytearray | memoryview) -> None:
    """The CRC of every chunk the pixels come from, up to IEND: the critical ones (IHDR,
    PLTE, IDAT, IEND) and an APNG's frame data (fdAT). Pillow checks none of the pixel
    data's, nor zlib's own checksum when the rows end first: a byte flipped there decoded,
    about one time in three, to wrong pixels without a word. An ancillary chunk with a bad
    CRC (a tEXt a metadata tool rewrote) is passed over, as libpng does."""
    view = memoryview(data).cast("B")
    pos = 8  # the signature
    while pos + 12 <= len(view):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(view):
            return  # cut short: Pillow's load refuses what it misses
        kind = bytes(view[pos + 4 : pos + 8])
        pixels = not kind[0] & 0x20 or kind == b"fdAT"  # (lower case first: ancillary)
        if pixels and zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            raise DecompressionError(
                f"cannot decode image: PNG chunk {kind.decode('latin-1')!r} at byte {pos} "
                "fails its CRC (damaged)"
            )
        if kind == b"IEND":
            return
        pos = end + 4


def _check_scans(data: bytes | bytearray | memoryview) -> None:
    """Refuse a progressive JPEG of more scans than any encoder writes: each costs a pass
    over the whole image. Counted from its first scan to its end-of-image marker (a 0xFF
    in entropy-coded data is followed by 0x00, so every ``FF DA`` there starts a scan);
    not in the metadata before it (an EXIF thumbnail is a JPEG of its own) nor in what a
    phone appends after it."""
    image = bytes(data)
    start = _first_scan(image)
    end = image.find(b"\xff\xd9", start)
    scans = image.count(b"\xff\xda", start, end if end >= 0 else len(image))
    if scans > config.MAX_JPEG_SCANS:
        raise DecompressionError(
            f"cannot decode image: a progressive JPEG of {scans:,} scans, over the limit of "
            f"{config.MAX_JPEG_SCANS:,} (each decodes the whole image again); raise "
            "pixcrawler.config.MAX_JPEG_SCANS to allow it"
        )


def _first_scan(data: bytes) -> int:
    """Where a JPEG's first scan starts: its segments walked by their lengths (0 where
    they cannot be: the whole file is counted then)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:
            return pos
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            return 0
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return 0


def _check_tiles(image: TiffImageFile) -> None:
    """Refuse a TIFF whose tiles are far larger than its image: libtiff inflates a whole
    tile into memory, so an 8x8 image of one 16384x16384 tile took 800 MB."""
    width, height = image.size
    try:
        tile = int(image.tag_v2.get(_TILE_WIDTH, 0)) * int(image.tag_v2.get(_TILE_LENGTH, 0))
    except (TypeError, ValueError):  # an odd type: Pillow's own reading decides
        return
    if tile > max(4 * width * height, _MAX_SMALL_TILE):
        raise DecompressionError(
            f"cannot decode image: a {width}x{height} TIFF in tiles of {tile:,} pixels "
            "(a decompression bomb?)"
        )


def _drafted(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size Pillow's ``JpegImageFile.draft`` scales a JPEG to for ``target``: by the
    largest of 1/8, 1/4, 1/2 that keeps it at least the target (libjpeg would also scale
    by 7/8, 3/4 ...; a photo a little larger than its target would then come out of
    simplejpeg other than out of Pillow)."""
    th, tw = target
    fits = min(width // tw, height // th)
    scale = next((s for s in (8, 4, 2) if fits >= s), 1)
    return -(-height // scale), -(-width // scale)


def _allow_in_pillow(max_pixels: int) -> None:
    """Let Pillow open what ``max_pixels`` allows: it refuses past twice its own
    ``Image.MAX_IMAGE_PIXELS``, which this raises (never lowers) to match."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and 2 * limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


def validate_image_size(image_size: Any, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` as two positive ints, or a ValueError naming what was given. At most
    2**28 pixels (a typo guard), or ``max_pixels`` (default
    ``pixcrawler.config.MAX_IMAGE_PIXELS``) where that is more.

    Only whole numbers count: ``"64"`` is not ``(6, 4)``, nor ``224.9`` 224, nor True 1.
    """
    try:
        if isinstance(image_size, str | bytes):
            raise TypeError("a string")
        values = tuple(image_size)
        if any(isinstance(v, bool) for v in values):
            raise TypeError("a bool")
        height, width = (operator.index(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"image_size must be two ints (height, width), got {image_size!r}"
        ) from exc
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    limit = max(_MAX_TARGET_PIXELS, config.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    if height * width > limit:
        raise ValueError(
            f"image_size {height}x{width} is {height * width:,} pixels, over the limit of "
            f"{limit:,} for one image (raise pixcrawler.config.MAX_IMAGE_PIXELS to allow it)"
        )
    return height, width


# A target size past this (16,384 x 16,384, 768 MiB of RGB) is a typo, not an image: an
# array of them would be reserved on disk or in memory before the first one is decoded.
_MAX_TARGET_PIXELS = 1 << 28


def _pillow_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not cost the image
        return 1
    # As ImageOps.exif_transpose looks it up: any number equal to 1–8 (a FLOAT or
    # RATIONAL 6 rotates as 6 does); anything else is no orientation.
    try:
        return next(code for code in range(1, 9) if value == code)
    except (StopIteration, TypeError, ValueError):
        return 1


UNKNOWN_ORIENTATION = 0
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


def jpeg_orientation(data: bytes | bytearray | memoryview) -> int:
    """The EXIF orientation (1–8) of a JPEG, read from its APP1 segment; 1 if it has none.

    :data:`UNKNOWN_ORIENTATION` (0) wherever this reading might differ from Pillow's: a
    segment it does not walk as Pillow does, an Orientation field of a type or in a place
    it does not read, an XMP packet that mentions an orientation. Pillow decides those.
    """
    return _jpeg_header(data)[0]


def _jpeg_header(data: bytes | bytearray | memoryview) -> tuple[int, bool]:
    """:func:`jpeg_orientation`, and whether a progressive frame header came before the
    first scan (or before the walk gave up)."""
    view = memoryview(data)
    pos = 2
    end = len(view)
    orientation = 1
    progressive = False
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return UNKNOWN_ORIENTATION, progressive
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker (ITU T.81 B.1.1.2)
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return orientation, progressive
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            return UNKNOWN_ORIENTATION, progressive
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2:
            return UNKNOWN_ORIENTATION, progressive
        progressive = progressive or marker in _PROGRESSIVE_FRAMES
        segment = view[pos + 4 : pos + 2 + length]
        if marker == 0xE1:
            head = bytes(segment[:29])
            if head.startswith(b"Exif\x00\x00"):
                if orientation != 1:  # a second EXIF block: which one counts is Pillow's
                    return UNKNOWN_ORIENTATION, progressive
                orientation = _tiff_orientation(bytes(segment[6:]))
                if orientation == UNKNOWN_ORIENTATION:
                    return orientation, progressive
            elif head == _XMP and b"Orientation" in bytes(segment):  # Pillow applies XMP's
                return UNKNOWN_ORIENTATION, progressive
        pos += 2 + length
    return orientation, progressive


# The TIFF field types read here, as Pillow reads them (as integers, so it rotates by
# them): SHORT, LONG, SSHORT, SLONG. Any other type is left to Pillow.
_EXIF_INTEGER_TYPES = {3: "H", 4: "I", 8: "h", 9: "i"}


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation an EXIF block's first IFD holds; unknown for anything malformed."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return UNKNOWN_ORIENTATION
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return UNKNOWN_ORIENTATION
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    found = 1
    seen = False
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return UNKNOWN_ORIENTATION
        tag, kind, _count = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _ORIENTATION_TAG:
            code = _EXIF_INTEGER_TYPES.get(kind)
            if code is None or seen:  # a type Pillow may read otherwise; a second entry
                return UNKNOWN_ORIENTATION
            (value,) = struct.unpack_from(order + code, tiff, entry + 8)
            found = value if 1 <= value <= 8 else 1
            seen = True
    return found
