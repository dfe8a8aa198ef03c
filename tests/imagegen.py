"""Small photo-like test images, generated deterministically with Pillow and numpy.

Each image is a smooth two-colour gradient with sensor-like noise and one shape (ellipse
or rectangle) filled with a colour that depends only on the label, so a classifier can
learn the label from colour, and a lossy codec has realistic content to chew on::

    from imagegen import make_image_folder

    src = make_image_folder(tmp_path / "src", {"cat": 10, "dog": 10}, formats=("jpg", "png"))
    # src/cat/0000.jpg, src/cat/0001.png, ... src/dog/0009.png

Everything is a pure function of (seed, label, index): the same call writes the same
pixels (and, with the same Pillow build, the same bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from constants import TEST_KEY  # noqa: F401  re-exported for tests that import imagegen only

__all__ = [
    "EXTENSION_FORMATS",
    "SizeSpec",
    "label_colour",
    "make_image",
    "make_image_folder",
    "save_image",
]

# File extension -> Pillow format, for every extension the packer accepts.
EXTENSION_FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "bmp": "BMP",
    "webp": "WEBP",
    "tif": "TIFF",
    "tiff": "TIFF",
}

# (H, W) for all images; a sequence cycled by image index; or f(label, index) -> (H, W).
SizeSpec = tuple[int, int] | Sequence[tuple[int, int]] | Callable[[str, int], tuple[int, int]]

_JPEG_QUALITY = 90
_NOISE_STD = 6.0


def label_colour(label: str) -> tuple[int, int, int]:
    """A saturated RGB colour that is a stable function of ``label`` (not of ``hash()``)."""
    h = hashlib.sha256(label.encode("utf-8")).digest()
    # One channel high, one low, one anywhere: labels differ clearly in colour.
    order = h[0] % 3
    channels = [230 - h[1] % 40, 20 + h[2] % 40, h[3]]
    rgb = channels[order:] + channels[:order]
    return rgb[0], rgb[1], rgb[2]


def make_image(
    label: str,
    size: tuple[int, int] = (32, 48),
    *,
    seed: int = 0,
    index: int = 0,
    mode: str = "RGB",
) -> Image.Image:
    """One photo-like image of ``size`` = (H, W) for ``label``, converted to ``mode``."""
    height, width = size
    rng = np.random.default_rng([seed, _stable_int(label), index])
    top, bottom = rng.integers(40, 216, size=(2, 3))
    # A diagonal gradient between two random colours: smooth, like sky or a wall.
    t = (np.linspace(0, 1, height)[:, None] + np.linspace(0, 1, width)[None, :]) / 2
    pixels = top[None, None, :] * (1 - t[..., None]) + bottom[None, None, :] * t[..., None]
    pixels += rng.normal(0, _NOISE_STD, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    # The shape covers a third to two thirds of each side, somewhere in the frame.
    sh = int(rng.integers(max(1, height // 3), max(2, 2 * height // 3 + 1)))
    sw = int(rng.integers(max(1, width // 3), max(2, 2 * width // 3 + 1)))
    y0 = int(rng.integers(0, max(1, height - sh + 1)))
    x0 = int(rng.integers(0, max(1, width - sw + 1)))
    box = (x0, y0, x0 + sw - 1, y0 + sh - 1)
    colour = label_colour(label)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)

    if mode == "RGBA":
        alpha = np.linspace(64, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
        image.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
        return image
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image if mode == "RGB" else image.convert(mode)


def save_image(image: Image.Image, path: Path, *, exif_orientation: int | None = None) -> Path:
    """Save ``image`` in the format its suffix names, converting the mode only if it must.

    ``exif_orientation`` (JPEG, WebP, PNG, TIFF) writes that EXIF Orientation tag, so the
    displayed image is the stored one transposed (5-8 swap width and height).
    """
    path = Path(path)
    fmt = EXTENSION_FORMATS[path.suffix.lower().lstrip(".")]
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    elif fmt == "GIF" and image.mode not in ("P", "L"):
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif fmt == "BMP" and image.mode not in ("RGB", "L", "P", "1"):
        image = image.convert("RGB")
    kwargs: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = _JPEG_QUALITY
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


def make_image_folder(
    root: Path,
    labels: Mapping[str, int],
    *,
    size: SizeSpec = (32, 48),
    formats: Sequence[str] = ("jpg",),
    seed: int = 0,
) -> Path:
    """Write ``labels[label]`` images per label under ``root/<label>/``; return ``root``.

    Files are named ``0000.<ext>``, ``0001.<ext>`` ...; image ``i`` of a label gets
    format ``formats[i % len(formats)]`` and size ``size`` (a fixed (H, W)), the
    ``i % len``-th of a list of sizes, or ``size(label, i)``. A label may be nested
    (``"animals/cat"``), which the packer turns into the label ``animals/cat``.
    """
    root = Path(root)
    if not formats:
        raise ValueError("formats must name at least one extension")
    for fmt in formats:
        if fmt.lower() not in EXTENSION_FORMATS:
            raise ValueError(f"unknown image extension {fmt!r}")
    for label, count in labels.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ext = formats[i % len(formats)]
            image = make_image(label, _size_of(size, label, i), seed=seed, index=i)
            save_image(image, folder / f"{i:04d}.{ext}")
    return root


def _size_of(size: SizeSpec, label: str, index: int) -> tuple[int, int]:
    if callable(size):
        return size(label, index)
    if len(size) == 2 and all(isinstance(v, int) for v in size):
        return size  # type: ignore[return-value]
    sizes = list(size)
    value = sizes[index % len(sizes)]
    return value  # type: ignore[return-value]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
