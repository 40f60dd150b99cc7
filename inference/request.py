"""GenerationRequest / GenerationResult: the one request type every door produces.

Validation happens when a request is built, with messages that name the field and the allowed
range, so the UI, the API and the Kafka consumer all reject bad input the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from inference.errors import InvalidRequest
from inference.loras import parse_request_loras
from inference.presets import Preset, get_preset

MAX_PROMPT_CHARS = 2000
MIN_SIDE, MAX_SIDE = 256, 2048
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
OUTPUT_FORMATS = ("png", "webp")
MAX_IMAGES = 4  # variants per request: one user's in-flight cap (MAX_JOBS_PER_USER) defaults to 4 too
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DEFAULT_STRENGTH = 0.6  # img2img: how far from the sketch the result may go (1.0: nothing of it is kept)
PRIORITIES = ("interactive", "bulk")  # interactive (people waiting) runs before bulk (the backend's batches)
MAX_WEBHOOK_URL_CHARS = 2000
EXPERIMENT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
ARMS = ("control", "variant")  # an A/B experiment's arms (queueing/experiments.py)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, floats as floats. Used for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _text(name: str, value: Any, *, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidRequest(name, f"must be text, got {type(value).__name__}")
    # NFC so that visually identical prompts share one fingerprint (and one cache entry).
    text = unicodedata.normalize("NFC", value).strip()
    if "\x00" in text:
        raise InvalidRequest(name, "must not contain NUL characters")
    if required and not text:
        raise InvalidRequest(name, f"must not be blank (1..{MAX_PROMPT_CHARS} characters)")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(name, f"is {len(text)} characters; at most {MAX_PROMPT_CHARS} allowed")
    return text


def _integer(name: str, value: Any, low: int, high: int) -> int:
    # Gradio numbers arrive as floats (512.0); accept integral floats, refuse bools and fractions.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, f"must be a whole number in {low}..{high}, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise InvalidRequest(name, f"must be a whole number in {low}..{high}, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidRequest(name, f"must be in {low}..{high}, got {number}")
    return number


def _side(name: str, value: Any) -> int:
    number = _integer(name, value, MIN_SIDE, MAX_SIDE)
    if number % 8:
        raise InvalidRequest(name, f"must be a multiple of 8 in {MIN_SIDE}..{MAX_SIDE}, got {number}")
    return number


def _guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest("guidance_scale", f"must be a number in 0..{MAX_GUIDANCE:g}, got {value!r}")
    if not 0 <= value <= MAX_GUIDANCE:
        raise InvalidRequest("guidance_scale", f"must be in 0..{MAX_GUIDANCE:g}, got {value}")
    return round(float(value), 4)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidRequest(name, f"must be one of {list(allowed)}, got {value!r}")
    return value


def _webhook_url(value: Any) -> str:
    """Shape only (http/https, a host, no credentials); which hosts may be called is the Space's
    allow-list (queueing.webhooks), checked at submit and again before every delivery."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > MAX_WEBHOOK_URL_CHARS:
        raise InvalidRequest("webhook_url", f"must be an http(s) URL of at most {MAX_WEBHOOK_URL_CHARS} characters")
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise InvalidRequest("webhook_url", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("webhook_url", "must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidRequest("webhook_url", "must not carry credentials; verify the signature header instead")
    return value.strip()


def _init_image(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise InvalidRequest("init_image", "must be the sha256 (64 lowercase hex digits) of an uploaded image "
                                           "(inputs/<first 2>/<sha256>.png in the object store)")
    return value


def _strength(value: Any, steps: int) -> float:
    value = DEFAULT_STRENGTH if value is None or value == "" else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise InvalidRequest("strength", f"must be a number in 0..1 (above 0), got {value!r}")
    if int(steps * value) < 1:  # diffusers runs int(steps * strength) steps of the schedule
        raise InvalidRequest("strength", f"{value:g} with {steps} steps runs no denoising step: steps x strength "
                                         f"must be at least 1 (raise steps or strength)")
    return round(float(value), 4)


def _experiment_arm(experiment: Any, arm: Any) -> dict[str, str]:
    if experiment in (None, "") and arm in (None, ""):
        return {}
    if not isinstance(experiment, str) or not EXPERIMENT_NAME.fullmatch(experiment):
        raise InvalidRequest("experiment", f"must be 1..40 of a-z 0-9 _ - , got {experiment!r}")
    return {"experiment": experiment, "arm": _choice("arm", arm, ARMS)}


def _request_id(value: Any) -> str:
    if value is None or value == "":
        return uuid.uuid4().hex
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.fullmatch(value):
        raise InvalidRequest(
            "request_id", "must be 1..128 characters of letters, digits and . _ : - (starting alphanumeric)"
        )
    return value


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    preset: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    output_format: str = "png"
    # img2img: the sha256 of the start image (stored under inputs/ in the object store: never in a
    # message) and how much it may change. Empty/0.0 for text-to-image, and then left out of the
    # fingerprint and the wire form, so text-to-image fingerprints are what they always were.
    init_image: str = ""
    strength: float = 0.0
    # Styles: (LoRA name, weight) pairs sorted by name; empty for none (then left out like init_image).
    loras: tuple[tuple[str, float], ...] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    seed_was_given: bool = field(default=True, compare=False)
    # How it is delivered, not what it draws: outside the fingerprint (compare=False), so a bulk or
    # webhook request is a cache hit for the same image asked interactively, and the reverse.
    priority: str = field(default="interactive", compare=False)
    webhook_url: str = field(default="", compare=False)
    # The A/B experiment and arm the door put it in (queueing/experiments.py). The arm's pixels are in
    # the fields above (a variant's styles are in loras); the labels are only recorded.
    experiment: str = field(default="", compare=False)
    arm: str = field(default="", compare=False)

    @classmethod
    def create(
        cls,
        prompt: Any,
        negative_prompt: Any = "",
        preset: Any = "turbo",
        width: Any = None,
        height: Any = None,
        steps: Any = None,
        guidance_scale: Any = None,
        seed: Any = None,
        output_format: Any = "png",
        request_id: Any = None,
        priority: Any = "interactive",
        webhook_url: Any = None,
        init_image: Any = None,
        strength: Any = None,
        loras: Any = None,
        experiment: Any = None,
        arm: Any = None,
    ) -> GenerationRequest:
        """Validate raw input (from a form, an API call or a message); omitted values take the preset's."""
        if not isinstance(preset, str):
            raise InvalidRequest("preset", f"must be a preset name, got {preset!r}")
        chosen: Preset = get_preset(preset)
        fields_ = {
            "prompt": _text("prompt", prompt, required=True),
            "negative_prompt": _text("negative_prompt", negative_prompt, required=False),
            "preset": chosen.name,
            "width": _side("width", chosen.width if width is None else width),
            "height": _side("height", chosen.height if height is None else height),
            "steps": _integer("steps", chosen.default_steps if steps is None else steps, 1, chosen.max_steps),
            "guidance_scale": _guidance(chosen.guidance_scale if guidance_scale is None else guidance_scale),
            "output_format": _choice("output_format", output_format or "png", OUTPUT_FORMATS),
        }
        chosen.check_size(fields_["width"], fields_["height"])
        fields_["init_image"] = _init_image(init_image)
        fields_["strength"] = _strength(strength, fields_["steps"]) if fields_["init_image"] else 0.0
        fields_["loras"] = parse_request_loras(loras)
        seed_was_given = seed is not None and seed != ""
        # Derived from the other fields: the same request always makes the same image (and hits cache).
        fields_["seed"] = _integer("seed", seed, 0, MAX_SEED) if seed_was_given else derive_seed(_seed_fields(fields_))
        return cls(**fields_, request_id=_request_id(request_id), seed_was_given=seed_was_given,
                   priority=_choice("priority", priority or "interactive", PRIORITIES),
                   webhook_url=_webhook_url(webhook_url), **_experiment_arm(experiment, arm))

    def variants(self, num_images: Any) -> list[GenerationRequest]:
        """This request and num_images - 1 siblings on the next seeds (seed, seed+1, ... wrapping at
        2**32): each is an ordinary request with its own id, fingerprint and cache entry, so asking
        later for one of them (its seed given) is a cache hit."""
        count = _integer("num_images", num_images, 1, MAX_IMAGES)
        siblings = [
            replace(self, seed=(self.seed + offset) % (MAX_SEED + 1), request_id=uuid.uuid4().hex,
                    seed_was_given=True)
            for offset in range(1, count)
        ]
        return [self, *siblings]

    def pixel_fields(self) -> dict[str, Any]:
        """Everything in the request that changes the output bytes (the model is added by storage.keys)."""
        pixels = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        if not self.init_image:
            del pixels["init_image"], pixels["strength"]
        if not self.loras:
            del pixels["loras"]
        return pixels

    def to_dict(self) -> dict[str, Any]:
        """Wire form: the seed is always explicit, so every consumer renders the same image."""
        data = asdict(self)
        del data["seed_was_given"]
        # Defaults are left out: the message of a plain request is what workers before these fields read.
        data["loras"] = [{"name": name, "weight": weight} for name, weight in self.loras]
        for name, default in (("priority", "interactive"), ("webhook_url", ""), ("init_image", ""),
                              ("strength", 0.0), ("loras", []), ("experiment", ""), ("arm", "")):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Re-validate a dict made by to_dict (or by any producer): never trust the wire."""
        if not isinstance(data, dict):
            raise InvalidRequest("request", f"must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"seed_was_given"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(unknown[0], f"is not a known field; known fields are {sorted(known)}")
        if "prompt" not in data:
            raise InvalidRequest("prompt", "is required")
        return cls.create(**{k: v for k, v in data.items() if k in known})


def _seed_fields(fields_: dict[str, Any]) -> dict[str, Any]:
    """The fields a derived seed hashes: those in use (a text-to-image request's seed is what it always was)."""
    unused = ({"init_image", "strength"} if not fields_["init_image"] else set()) | ({"loras"} if not fields_["loras"] else set())
    return {k: v for k, v in fields_.items() if k not in unused}


def derive_seed(pixel_fields_without_seed: dict[str, Any]) -> int:
    return int(sha256_hex(pixel_fields_without_seed)[:8], 16)


@dataclass(frozen=True)
class GenerationResult:
    """What a finished request returns; small enough to cache as JSON in Redis."""

    request_id: str
    fingerprint: str
    seed: int
    url: str
    object_key: str
    content_type: str
    width: int
    height: int
    steps: int
    preset: str
    model: str
    model_revision: str = ""  # the commit the weights were loaded at (a folder's "sha256:..."), else the name
    worker: str = ""
    backend: str = ""  # who made the image: local (a Space's own worker), fleet (a queue worker), remote (GPU service)
    storage: str = ""  # where the object lives: primary (R2) or fallback (S3_FALLBACK_*); empty for a local folder
    cached: bool = False
    persisted: bool = True  # False: the object store failed; this Space serves the image meanwhile
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
