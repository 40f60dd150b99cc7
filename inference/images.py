"""Encoding images with generation parameters that other Stable Diffusion tools can read."""

from __future__ import annotations

import base64
import hashlib
import io

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from inference.errors import InvalidRequest
from inference.request import MAX_SIDE, GenerationRequest

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp"}
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
MAX_INIT_IMAGE_BYTES = 20 * 1024 * 1024
INIT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Modes with one obvious RGB reading; CMYK, 16-bit and float images need a colour decision we will not guess.
INIT_IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")


def init_image_key(sha256: str) -> str:
    """Where an uploaded start image lives in the object store (content-addressed, like the outputs)."""
    return f"inputs/{sha256[:2]}/{sha256}.png"


def prepare_init_image(data: bytes) -> tuple[str, bytes]:
    """A start image as the fleet stores it: (sha256 of its RGB pixels, PNG bytes). The hash is of the
    pixels, not the file, so the same picture saved twice is one image, one fingerprint. Refuses what
    is not an image, too large, or in a mode without an obvious RGB reading, naming the field."""
    if len(data) > MAX_INIT_IMAGE_BYTES:
        raise InvalidRequest("init_image", f"is {len(data) / 1e6:.1f} MB; at most {MAX_INIT_IMAGE_BYTES // 2**20} MB")
    try:
        image = Image.open(io.BytesIO(data))
        image.size  # noqa: B018 (the header is read lazily)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise InvalidRequest("init_image", "is not an image (PNG, JPEG or WebP)") from None
    if image.format not in INIT_IMAGE_FORMATS:
        raise InvalidRequest("init_image", f"is {image.format}; use PNG, JPEG or WebP")
    if max(image.size) > MAX_SIDE:
        raise InvalidRequest("init_image", f"is {image.width}x{image.height}; at most {MAX_SIDE} pixels a side")
    if image.mode not in INIT_IMAGE_MODES:
        raise InvalidRequest("init_image", f"has mode {image.mode}; use an RGB or RGBA image (8 bits a channel)")
    try:
        rgb = _to_rgb(image)
    except OSError:
        raise InvalidRequest("init_image", "is truncated or corrupt") from None
    sha = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return sha, buffer.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparency becomes white (a sketch on a transparent canvas is a sketch on paper)."""
    if image.mode in ("RGBA", "LA", "PA", "P"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def parameters_text(request: GenerationRequest, sampler: str, model: str, model_hash: str = "") -> str:
    """The A1111 `parameters` format: prompt, `Negative prompt:` line, then `Key: value` pairs.
    model_hash: the commit the weights were loaded at (A1111 writes a short hash of the checkpoint)."""
    settings = ", ".join(
        f"{key}: {value}"
        for key, value in (
            ("Steps", request.steps),
            ("Sampler", sampler),
            ("CFG scale", f"{request.guidance_scale:g}"),
            ("Seed", request.seed),
            ("Size", f"{request.width}x{request.height}"),
            *((("Model hash", model_hash.removeprefix("sha256:")[:10]),) if model_hash else ()),
            ("Model", model),
            *((("Denoising strength", f"{request.strength:g}"), ("Init image hash", request.init_image[:12]))
              if request.init_image else ()),
        )
    )
    # Styles as other tools write them: <lora:name:weight> in the prompt line (A1111, ComfyUI readers).
    lines = [" ".join([request.prompt, *(f"<lora:{name}:{weight:g}>" for name, weight in request.loras)])]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(settings)
    return "\n".join(lines)


def encode(image: Image.Image, fmt: str, parameters: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", parameters)  # iTXt: UTF-8, so non-Latin prompts survive
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt == "webp":
        exif = Image.Exif()
        # UserComment with the UNICODE prefix is where A1111 and its readers look in WebP/JPEG.
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters.encode("utf-16-be")
        image.save(buffer, format="WEBP", quality=90, exif=exif)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The parameters text embedded by `encode`, or None."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return image.info.get("parameters")
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
        return comment[8:].decode("utf-16-be")
    return comment


# Live previews travel as data: URLs (inference/preview.py makes the JPEG; this module needs no torch, so
# the app and the worker can import it before ZeroGPU's `spaces`, which must come before torch).
def preview_data_url(jpeg: bytes) -> str:
    """Small enough to travel inline in /status and the job record (a 256 px JPEG is a few KB)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def image_from_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
