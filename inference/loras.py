"""Styles: LoRA adapters a Space allows (LORAS), loaded once beside the base model and switched per request.

LORAS is a JSON object: name -> source (a hub id or a local folder with the adapter's safetensors), or
name -> {"source": ..., "label": "Pixel art", "weight_name": "file.safetensors", "revision": "main"}:

    LORAS='{"pixel": {"source": "nerijs/pixel-art-xl", "weight_name": "pixel-art-xl.safetensors",
            "label": "Pixel art"}, "ink": "/data/loras/ink"}'

A request names adapters with weights (`loras`); the names and weights are part of its fingerprint, and
so is each adapter's source, so pointing a name at other weights never serves an old cached image.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequest

MAX_LORAS = 3
MAX_LORA_WEIGHT = 2.0
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class LoraSpec:
    name: str
    source: str
    label: str = ""
    weight_name: str | None = None
    revision: str = "main"

    @property
    def key(self) -> str:
        """What the fingerprint records: where the weights come from."""
        return f"{self.source}@{self.revision}/{self.weight_name or ''}"

    @property
    def display(self) -> str:
        return self.label or self.name


def parse_loras_setting(text: str | None) -> tuple[LoraSpec, ...]:
    """LORAS, or ValueError naming it and what is wrong (the app stops with that line)."""
    if not text:
        return ()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"LORAS is not JSON ({error.msg}); expected {{\"name\": \"hub id or folder\", ...}}") from None
    if not isinstance(entries, dict):
        raise ValueError("LORAS must be a JSON object: {\"name\": \"hub id or folder\", ...}")
    return tuple(_spec(name, entry) for name, entry in sorted(entries.items()))


def _spec(name: str, entry: Any) -> LoraSpec:
    if not NAME.fullmatch(name):
        raise ValueError(f"LORAS: name {name!r} must be 1..32 lowercase letters, digits, _ or -")
    if isinstance(entry, str):
        entry = {"source": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"]:
        raise ValueError(f"LORAS: {name!r} needs a source (a hub id or a folder)")
    unknown = set(entry) - {"source", "label", "weight_name", "revision"}
    if unknown:
        raise ValueError(f"LORAS: {name!r} has unknown key(s) {sorted(unknown)}")
    return LoraSpec(name, entry["source"], str(entry.get("label", "")), entry.get("weight_name"),
                    str(entry.get("revision") or "main"))


def parse_request_loras(value: Any) -> tuple[tuple[str, float], ...]:
    """A request's adapters, sorted by name (the order does not change the image): None/""/[] for none;
    a list of {"name", "weight"} objects, [name, weight] pairs or "name:weight" strings; or one string
    "pixel:0.8, ink" (weight 1 when left out)."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest("loras", f"must be a list of {{\"name\", \"weight\"}} objects, got {type(value).__name__}")
    if len(value) > MAX_LORAS:
        raise InvalidRequest("loras", f"at most {MAX_LORAS} styles per request, got {len(value)}")
    pairs = [_pair(item) for item in value]
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise InvalidRequest("loras", f"each style at most once, got {names}")
    return tuple(sorted(pairs))


def _pair(item: Any) -> tuple[str, float]:
    if isinstance(item, str):
        name, _, weight = item.strip().partition(":")
        item = {"name": name.strip(), "weight": float(weight) if _is_number(weight) else (weight or None)}
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        item = {"name": item[0], "weight": item[1]}
    if not isinstance(item, dict) or set(item) - {"name", "weight"}:
        raise InvalidRequest("loras", "each style is {\"name\": ..., \"weight\": ...} or \"name:weight\"")
    name, weight = item.get("name"), item.get("weight", 1.0)
    weight = 1.0 if weight is None else weight
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest("loras", f"style name {name!r} is not a name this Space could offer")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or abs(weight) > MAX_LORA_WEIGHT:
        raise InvalidRequest("loras", f"weight of {name!r} must be a number in -{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}, "
                                      f"got {weight!r}")
    return name, round(float(weight), 4)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class LoraCatalog:
    """The Space's allow-list, as the door checks it (the worker checks again against what it loaded)."""

    def __init__(self, specs: tuple[LoraSpec, ...]) -> None:
        self.specs = {spec.name: spec for spec in specs}

    def check(self, loras: tuple[tuple[str, float], ...]) -> None:
        for name, _ in loras:
            if name not in self.specs:
                offered = ", ".join(f"{s.name} ({s.display})" for s in self.specs.values()) or "none (LORAS is not set)"
                raise InvalidRequest("loras", f"unknown style {name!r}; this Space offers: {offered}")

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for the page's Styles box."""
        return [(spec.display, spec.name) for spec in self.specs.values()]
