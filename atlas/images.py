"""Images as prompt inputs: safe decoding, content hashes and a content-addressed store.

Pure Pillow and hashlib. Every bad input (a missing file, an empty file, bytes that are not an
image, a truncated image, an image over the pixel limit) raises :class:`atlas.errors.InputError`
with one line that names the file, so the CLI can print it and a batch can go on.

The pixel limit is checked from the header, before any pixel is decoded. Pillow's own
decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``; it refuses images over twice that) stays
in force, so a limit above Pillow's hard limit is capped by it; its error is translated too.

Images are stored once, by the sha256 of their file bytes, under
``ROOT/images/<sha[:2]>/<sha>.<ext>`` (``ext`` from the decoded format).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from atlas.errors import InputError

#: Default pixel limit (width x height): 50 megapixels, far above any model's input size.
DEFAULT_MAX_PIXELS = 50_000_000

#: File extension per Pillow format name (formats not listed use the lower-cased name).
_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}


@dataclass(frozen=True)
class ImageInfo:
    """What the artifact records about an input image.

    Attributes:
        sha256: hex digest of the file's bytes (the content address).
        width, height: size in pixels of the decoded image (the first frame).
        format: Pillow's format name (``PNG``, ``JPEG``, ...).
    """

    sha256: str
    width: int
    height: int
    format: str

    @property
    def extension(self) -> str:
        """File extension the store uses for this format."""
        return _EXTENSIONS.get(self.format, self.format.lower())


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image ready for a processor.

    Attributes:
        image: the RGB image (transparency composited onto white, as transformers' processors do).
        info: hash, size and format.
        data: the original file bytes (what the store keeps).
        name: how error messages name the image (its path as the user gave it), if known.
    """

    image: Image.Image
    info: ImageInfo
    data: bytes
    name: str | None = None


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``: the content address of an image file."""
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of the file at ``path``; a missing or unreadable file is an :class:`InputError`."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such image file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a directory, not an image file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read image file ({exc.strerror or exc})") from exc


def load_image(
    source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> LoadedImage:
    """Decode an image file from a path or from its bytes, safely, into RGB.

    ``name`` is how error messages name the file (default: the path, or ``<bytes>``). Raises
    :class:`InputError` for an empty file, bytes that are not an image, an image with a zero
    side, one over ``max_pixels`` (checked before decoding) and a truncated or corrupt image.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = name or "<bytes>"
    else:
        data = read_image_bytes(source)
        label = name or str(source)
    if not data:
        raise InputError(f"{label}: empty file (0 bytes), not an image")
    if max_pixels <= 0:
        raise InputError(f"{label}: the pixel limit must be positive, got {max_pixels}")
    im = _open(data, label, max_pixels)
    _check_size(im, label, max_pixels)
    _decode(im, label)
    info = ImageInfo(
        sha256=sha256_bytes(data), width=im.width, height=im.height, format=str(im.format)
    )
    return LoadedImage(image=to_rgb(im), info=info, data=data, name=name or label)


def _open(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Open (header only) with Pillow's errors translated into one-line :class:`InputError`."""
    try:
        with warnings.catch_warnings():
            # our own limit decides; Pillow's warning band below its hard limit is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"{label}: image over the pixel limit ({max_pixels} pixels; Pillow refuses it: {exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label}: not an image file (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{label}: not a readable image ({exc})") from exc


def _check_size(im: Image.Image, label: str, max_pixels: int) -> None:
    """Refuse zero-sized and over-limit images from the header, before decoding pixels."""
    width, height = im.size
    if width <= 0 or height <= 0:
        raise InputError(f"{label}: image has zero size ({width} x {height})")
    if width * height > max_pixels:
        raise InputError(
            f"{label}: image of {width} x {height} = {width * height} pixels is over the pixel "
            f"limit of {max_pixels} (a decompression bomb?)"
        )


def _decode(im: Image.Image, label: str) -> None:
    """Decode all pixel data now, so a truncated or corrupt file fails here and not later."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"{label}: image over the pixel limit ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{label}: truncated or corrupt image ({exc})") from exc


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of ``im``; transparency is composited onto white (as transformers'
    ``convert_to_rgb`` does), so the pixels equal what the processor would make of the file."""
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------- content-addressed store
def _image_dir(root: Path, sha: str) -> Path:
    return Path(root) / "images" / sha[:2]


def store_image(root: str | Path, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Store the image file ``data`` once under ``root``; return its path.

    The bytes are validated first (only real images enter the store), written to a temporary
    file in the target directory and renamed into place, so a reader never sees a partial file
    and concurrent writers of the same image agree. An image already stored is not rewritten.
    """
    loaded = load_image(data, max_pixels=max_pixels)
    info = loaded.info
    directory = _image_dir(Path(root), info.sha256)
    path = directory / f"{info.sha256}.{info.extension}"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{info.sha256}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stored_image_path(root: str | Path, sha: str) -> Path:
    """Path of the stored image with hash ``sha``; :class:`InputError` when it is not stored."""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise InputError(f"{sha!r} is not a sha256 hex digest")
    directory = _image_dir(Path(root), sha)
    matches = sorted(directory.glob(f"{sha}.*")) if directory.is_dir() else []
    matches = [p for p in matches if not p.name.endswith(".tmp")]
    if not matches:
        raise InputError(f"image {sha} is not in the store at {root}")
    return matches[0]


def load_stored_image(
    root: str | Path, sha: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> LoadedImage:
    """Load the stored image with hash ``sha``, checking its bytes still hash to ``sha``.

    ``name`` (the file the submitter read) is how later errors about the image name it."""
    path = stored_image_path(root, sha)
    loaded = load_image(path, max_pixels=max_pixels)
    if loaded.info.sha256 != sha:
        raise InputError(
            f"{path}: stored image is corrupt (its bytes hash to {loaded.info.sha256})"
        )
    return dataclasses.replace(loaded, name=name) if name else loaded
