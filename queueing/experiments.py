"""A/B experiments (EXPERIMENT): a share of one preset's requests is rendered with a variant, the arm is
recorded in the request (so in its job and on any worker) and in /metrics, and designers' thumbs up/down
on results are counted per arm.

The variant is a set of styles (LoRA adapters this Space offers in LORAS, each with its own source and
revision): every worker of the preset already holds them, so both arms run on the fleet as it is and a
variant's image is an ordinary request with its own fingerprint and cache entry. A second base-model
revision would need a second copy of the model in every worker's memory; see README "Model versions".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequest
from inference.loras import LoraCatalog, parse_request_loras
from inference.presets import get_preset
from inference.request import ARMS, EXPERIMENT_NAME, GenerationRequest, sha256_hex

CONTROL, VARIANT = ARMS
VOTES = ("up", "down")


@dataclass(frozen=True)
class Experiment:
    name: str
    preset: str
    share: float  # of eligible requests, in 0..1
    loras: tuple[tuple[str, float], ...]  # the variant's styles

    def arm_for(self, request_id: str) -> str:
        """A stable draw per request id: a retry or a resubmission lands in the same arm."""
        draw = int(sha256_hex([self.name, request_id])[:8], 16) / 2**32
        return VARIANT if draw < self.share else CONTROL

    def eligible(self, request: GenerationRequest) -> bool:
        """Interactive requests of the preset that name no styles of their own: a designer's chosen
        style is never overridden, and the backend's bulk work gets exactly the pixels it asked for."""
        return (request.preset == self.preset and not request.loras and not request.experiment
                and request.priority == "interactive")

    def assign(self, request: GenerationRequest) -> GenerationRequest:
        """request, in an arm: the variant's styles are added to the variant arm's request (its seed
        stays, so the arms render the same seed)."""
        if not self.eligible(request):
            return request
        arm = self.arm_for(request.request_id)
        changes: dict[str, Any] = {"experiment": self.name, "arm": arm}
        if arm == VARIANT:
            changes["loras"] = self.loras
        return dataclasses.replace(request, **changes)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "share": self.share,
                "variant": {"loras": [{"name": name, "weight": weight} for name, weight in self.loras]}}


def parse_experiment_setting(raw: str | None) -> Experiment | None:
    """EXPERIMENT: {"name": "ink-style", "share": 0.2, "variant": {"loras": ["ink:0.8"]}, "preset": "turbo"}
    (preset optional: "" until the app fills in the preset it serves). Errors name the variable and field."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"Config 'EXPERIMENT' is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError("Config 'EXPERIMENT' must be a JSON object with name, share and variant")
    unknown = sorted(set(data) - {"name", "share", "variant", "preset"})
    if unknown:
        raise ValueError(f"Config 'EXPERIMENT' has unknown field(s) {unknown}; known: name, share, variant, preset")
    return Experiment(_name(data.get("name")), _preset(data["preset"]) if data.get("preset") else "",
                      _share(data.get("share")), _variant(data.get("variant")))


def _name(value: Any) -> str:
    if not isinstance(value, str) or not EXPERIMENT_NAME.fullmatch(value):
        raise ValueError(f"Config 'EXPERIMENT' field name must be 1..40 of a-z 0-9 _ - (a metric label), got {value!r}")
    return value


def _preset(value: Any) -> str:
    try:
        return get_preset(value).name
    except Exception as error:
        raise ValueError(f"Config 'EXPERIMENT' field preset: {error}") from None


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"Config 'EXPERIMENT' field share must be a number in 0..1 (the variant's share), "
                         f"got {value!r}")
    return float(value)


def check_experiment(experiment: Experiment | None, served_preset: str, offered: LoraCatalog) -> Experiment | None:
    """The experiment with its preset filled in, once the app knows what it serves; its styles must be
    offered (LORAS), or the variant arm could not be rendered anywhere."""
    if experiment is None:
        return None
    try:
        offered.check(experiment.loras)
    except InvalidRequest as error:
        raise ValueError(f"Config 'EXPERIMENT' field variant.{error} (add it to LORAS)") from None
    return experiment if experiment.preset else dataclasses.replace(experiment, preset=served_preset)


def _variant(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict) or set(value) != {"loras"}:
        raise ValueError("Config 'EXPERIMENT' field variant must be {\"loras\": [\"name\" or \"name:weight\", ...]} "
                         "naming styles of LORAS")
    try:
        loras = parse_request_loras(value["loras"])
    except Exception as error:
        raise ValueError(f"Config 'EXPERIMENT' field variant.{error}") from None
    if not loras:
        raise ValueError("Config 'EXPERIMENT' field variant.loras must name at least one style")
    return loras
