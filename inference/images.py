"""Encoding images with generation parameters that other Stable Diffusion tools can read."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from inference.request import GenerationRequest

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp"}
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


def parameters_text(request: GenerationRequest, sampler: str, model: str) -> str:
    """The A1111 `parameters` format: prompt, `Negative prompt:` line, then `Key: value` pairs."""
    settings = ", ".join(
        f"{key}: {value}"
        for key, value in (
            ("Steps", request.steps),
            ("Sampler", sampler),
            ("CFG scale", f"{request.guidance_scale:g}"),
            ("Seed", request.seed),
            ("Size", f"{request.width}x{request.height}"),
            ("Model", model),
        )
    )
    lines = [request.prompt]
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
