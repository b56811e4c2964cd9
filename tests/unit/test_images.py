"""atlas.images: safe decoding (bad inputs give one-line InputErrors naming the file), hashes and
the content-addressed store."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas.errors import InputError
from atlas.images import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    load_image,
    load_stored_image,
    sha256_bytes,
    store_image,
    stored_image_path,
    to_rgb,
)


def _png(width: int = 50, height: int = 40, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).convert(mode).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _jpeg(width: int = 64, height: int = 48, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no pixel data: what a
    decompression bomb looks like before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _error(source: Path | bytes, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------- good inputs
def test_load_from_path_and_bytes_agree(tmp_path: Path) -> None:
    data = _png()
    path = tmp_path / "hand.png"
    path.write_bytes(data)
    from_path = load_image(path)
    from_bytes = load_image(data)
    want = ImageInfo(sha256=hashlib.sha256(data).hexdigest(), width=50, height=40, format="PNG")
    assert from_path.info == want == from_bytes.info
    assert from_path.image.mode == "RGB" and from_path.image.size == (50, 40)
    assert from_path.image.tobytes() == from_bytes.image.tobytes()
    assert from_path.data == data
    assert sha256_bytes(data) == want.sha256


def test_jpeg_and_greyscale_become_rgb() -> None:
    jpeg = load_image(_jpeg())
    assert jpeg.info.format == "JPEG" and jpeg.info.extension == "jpg"
    assert jpeg.image.mode == "RGB" and jpeg.image.size == (64, 48)
    grey = load_image(_png(mode="L"))
    arr = np.asarray(grey.image)
    assert arr.shape == (40, 50, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_transparency_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[1, 1]) == (255, 255, 255)


# ---------------------------------------------------------------------- bad inputs
def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("how many fingers?\n")
    message = _error(path)
    assert str(path) in message and "not an image" in message


def test_zero_sized_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    message = _error(path)
    assert str(path) in message and "empty" in message


@pytest.mark.parametrize("make", [_png, _jpeg], ids=["png", "jpeg"])
def test_truncated_image(tmp_path: Path, make: object) -> None:
    data = make()  # type: ignore[operator]
    path = tmp_path / "cut.img"
    path.write_bytes(data[: len(data) // 2])
    message = _error(path)
    assert str(path) in message and "truncated" in message


def test_over_the_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png(50, 40))
    message = _error(path, max_pixels=1999)
    assert str(path) in message and "pixel limit" in message and "2000" in message
    assert load_image(path, max_pixels=2000).info.width == 50


def test_bomb_header_refused_before_decoding(tmp_path: Path) -> None:
    # 10000 x 10000 = 1e8 pixels: over our default limit, under Pillow's hard one
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))
    message = _error(path)
    assert str(path) in message and str(DEFAULT_MAX_PIXELS) in message
    # 30000 x 30000: Pillow's own guard refuses it at open; translated the same way
    path2 = tmp_path / "bigger.png"
    path2.write_bytes(_png_header_only(30_000, 30_000))
    message2 = _error(path2, max_pixels=10**10)
    assert str(path2) in message2 and "pixel limit" in message2


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    assert str(missing) in _error(missing)
    assert "directory" in _error(tmp_path)


def test_bytes_are_named_by_label() -> None:
    assert _error(b"GIF89a-not-really", name="upload.gif").startswith("upload.gif:")


# ---------------------------------------------------------------------- store
def test_store_round_trip_and_store_once(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    data = _png(seed=3)
    sha = hashlib.sha256(data).hexdigest()
    path = store_image(root, data)
    assert path == root / "images" / sha[:2] / f"{sha}.png"
    assert path.read_bytes() == data
    before = path.stat()
    again = store_image(root, data)
    after = again.stat()
    assert again == path
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    loaded = load_stored_image(root, sha)
    assert loaded.info.sha256 == sha and loaded.data == data
    assert loaded.image.tobytes() == load_image(data).image.tobytes()
    assert stored_image_path(root, sha) == path


def test_store_refuses_non_images_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    with pytest.raises(InputError):
        store_image(root, b"plain text, not a picture")
    assert not (root / "images").exists()


def test_unknown_bad_and_corrupt_stored_images(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    with pytest.raises(InputError, match="not in the store"):
        load_stored_image(root, "0" * 64)
    with pytest.raises(InputError, match="not a sha256"):
        load_stored_image(root, "../../etc/passwd")
    data = _png(seed=4)
    path = store_image(root, data)
    path.write_bytes(_png(seed=5))  # another valid image under the wrong name
    with pytest.raises(InputError, match="corrupt"):
        load_stored_image(root, hashlib.sha256(data).hexdigest())
