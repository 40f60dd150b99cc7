"""Pure functions that name things. Never Python's hash(): it differs per process."""

from __future__ import annotations

from inference.presets import ModelIdentity
from inference.request import GenerationRequest, sha256_hex

# Bump when a code change alters the pixels for the same request (scheduler setup, decoding...),
# so that old cache entries stop matching.
PIPELINE_VERSION = 1


def fingerprint(request: GenerationRequest, model: ModelIdentity) -> str:
    """sha256 of canonical JSON of everything that determines the output bytes."""
    return sha256_hex({"v": PIPELINE_VERSION, "request": request.pixel_fields(), "model": model.as_dict()})


def object_key(fingerprint_: str, output_format: str) -> str:
    """Content-addressed, with a 2-hex-digit prefix so no folder or listing grows too large."""
    return f"images/{fingerprint_[:2]}/{fingerprint_}.{output_format}"
