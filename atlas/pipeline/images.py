"""Images of image + text prompt specs: stored once at submission, loaded by the worker.

An image never travels inside a queue message. The submitter reads the file a spec names (a
batch file's ``"image"`` is relative to the batch file), validates it (:func:`atlas.images.
load_image`: not an image, truncated, empty, over ``image_max_pixels``), stores it content-addressed
in the artifact store (``ARTIFACT_DIR/images/<sha[:2]>/<sha>.<ext>``) and replaces the path in the
spec by ``sha256:<hex>``. That is what the message, the job record and the prompt's identity carry;
the GPU worker loads the bytes back from the store by it (checking they still hash to it).

A spec whose image is refused fails alone, with one line naming the file: it is recorded as a
failed item of its job, nothing is stored for it, and the rest of the batch goes on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from atlas.errors import InputError
from atlas.images import LoadedImage, load_image, load_stored_image, store_image
from atlas.pipeline.payloads import PromptSpec

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings

#: How a spec names a stored image.
IMAGE_REF = re.compile(r"^sha256:([0-9a-f]{64})$")


def image_sha(spec: PromptSpec) -> str | None:
    """The sha256 of a spec's stored image; ``None`` for a text prompt.

    A spec whose image is still a path (never submitted through :func:`store_spec_images`) is
    refused with one line: the worker cannot read the submitter's files.
    """
    if spec.image is None:
        return None
    m = IMAGE_REF.match(spec.image)
    if m is None:
        raise InputError(f"{spec.image}: image not in the artifact store (submit it first)")
    return m.group(1)


def store_spec_image(
    spec: PromptSpec, settings: AtlasSettings, base_dir: Path | None
) -> PromptSpec:
    """``spec`` with its image file stored and named by content address (no image: as is)."""
    if spec.image is None or IMAGE_REF.match(spec.image):
        return spec
    path = Path(spec.image).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    loaded = load_image(path, max_pixels=settings.image_max_pixels)
    store_image(settings.resolved_artifact_dir, loaded.data, max_pixels=settings.image_max_pixels)
    update = {"image": f"sha256:{loaded.info.sha256}", "image_name": spec.image}
    return spec.model_copy(update=update)


def store_spec_images(
    settings: AtlasSettings, specs: Sequence[PromptSpec], base_dir: Path | None = None
) -> tuple[list[PromptSpec], dict[int, str]]:
    """Store the images of ``specs``; returns the specs (images by content address) and the
    one-line reason of each refused spec by its index (that spec is returned unchanged)."""
    out: list[PromptSpec] = []
    refused: dict[int, str] = {}
    for i, spec in enumerate(specs):
        try:
            out.append(store_spec_image(spec, settings, base_dir))
        except InputError as exc:
            refused[i] = str(exc)
            out.append(spec)
    return out, refused


def load_spec_image(spec: PromptSpec, settings: AtlasSettings) -> LoadedImage | None:
    """The worker's copy of a spec's image, from the artifact store (``None`` for text)."""
    sha = image_sha(spec)
    if sha is None:
        return None
    return load_stored_image(
        settings.resolved_artifact_dir,
        sha,
        max_pixels=settings.image_max_pixels,
        name=spec.image_name,
    )


def load_image_ref(ref: str, settings: AtlasSettings) -> LoadedImage:
    """An image named as specs name it: ``sha256:<hex>`` of a stored image, or a file path
    (read and checked; not stored)."""
    m = IMAGE_REF.match(ref)
    if m is not None:
        return load_stored_image(
            settings.resolved_artifact_dir, m.group(1), max_pixels=settings.image_max_pixels
        )
    return load_image(Path(ref).expanduser(), max_pixels=settings.image_max_pixels, name=ref)


def stored_image_ref(ref: str, settings: AtlasSettings, base_dir: Path | None = None) -> str:
    """``ref`` as the ``sha256:<hex>`` of its stored image (a path is read, checked and stored;
    a relative one is taken from ``base_dir`` when given). What queued specs carry."""
    if IMAGE_REF.match(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    loaded = load_image_ref(str(path), settings)
    store_image(settings.resolved_artifact_dir, loaded.data, max_pixels=settings.image_max_pixels)
    return f"sha256:{loaded.info.sha256}"
