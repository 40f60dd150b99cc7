"""Named presets: which weights to load and the settings that make them fast and good."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidRequest

TAESDXL = "madebyollin/taesdxl"  # the tiny SDXL VAE: turbo/lightning decode with it; previews use it for any preset


@dataclass(frozen=True)
class Preset:
    name: str
    model_id: str
    default_steps: int
    max_steps: int
    width: int
    height: int
    guidance_scale: float
    # Scheduler class name in diffusers and config overrides (e.g. trailing timesteps for Lightning).
    scheduler: str
    scheduler_options: tuple[tuple[str, object], ...] = ()
    sampler_label: str = "Euler"  # how other SD tools name the sampler in PNG metadata
    tiny_vae_id: str | None = None  # TAESD decoder: ~100x cheaper than the full VAE decode
    unet_weights: tuple[str, str] | None = None  # (repo id, file) replacing the base UNet
    pipeline_class: str = "StableDiffusionXLPipeline"
    cpu_supported: bool = True
    max_pixels: int = 1024 * 1024
    description: str = ""

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise InvalidRequest(
                "width x height",
                f"{width}x{height} = {width * height} pixels exceeds the {self.name} preset's budget "
                f"of {self.max_pixels} pixels (for example {self.width}x{self.height})",
            )


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="turbo",
            model_id="stabilityai/sdxl-turbo",
            default_steps=1, max_steps=4, width=512, height=512, guidance_scale=0.0,
            scheduler="EulerAncestralDiscreteScheduler",
            scheduler_options=(("timestep_spacing", "trailing"),),
            sampler_label="Euler a",
            tiny_vae_id=TAESDXL,
            max_pixels=768 * 768,
            description="SDXL-Turbo: 1 step at 512x512, fastest on CPU",
        ),
        Preset(
            name="lightning",
            model_id=SDXL_BASE,
            default_steps=4, max_steps=8, width=1024, height=1024, guidance_scale=0.0,
            scheduler="EulerDiscreteScheduler",
            scheduler_options=(("timestep_spacing", "trailing"),),
            unet_weights=("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors"),
            tiny_vae_id=TAESDXL,
            max_pixels=1280 * 1280,
            description="SDXL-Lightning: 4 steps at 1024x1024",
        ),
        Preset(
            name="base",
            model_id=SDXL_BASE,
            default_steps=20, max_steps=50, width=1024, height=1024, guidance_scale=7.5,
            scheduler="EulerDiscreteScheduler",
            max_pixels=1280 * 1280,
            description="SDXL base 1.0: 20 steps with guidance (slow on CPU)",
        ),
        Preset(
            name="flux-schnell",
            model_id="black-forest-labs/FLUX.1-schnell",
            default_steps=4, max_steps=8, width=1024, height=1024, guidance_scale=0.0,
            scheduler="FlowMatchEulerDiscreteScheduler",
            pipeline_class="FluxPipeline",
            cpu_supported=False,
            description="FLUX.1 schnell: GPU only (does not fit a 16 GB CPU Space)",
        ),
    )
}

DEFAULT_CPU_PRESET = "turbo"
DEFAULT_GPU_PRESET = "lightning"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidRequest("preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights make the pixels. Computed from configuration alone (no torch), so any process
    in the fleet fingerprints a request the same way before a worker even loads the model.
    Device and dtype are left out on purpose: the fleet treats CPU/bf16 and GPU/fp16 renders of one
    request as the same result, so a cache hit made by any worker serves every caller."""

    preset: str
    model_id: str
    revision: str
    unet_weights: str
    vae: str
    scheduler: str
    loras: tuple[tuple[str, str], ...] = ()  # the allowed styles: (name, where its weights come from)
    # (component, commit) for model / unet_weights / vae once inference.revisions.pin resolved them: a
    # hub commit, or "sha256:..." of a local folder. Empty: fingerprinted by the revision's name.
    commits: tuple[tuple[str, str], ...] = ()

    @classmethod
    def resolve(
        cls,
        preset: Preset,
        model_id: str | None = None,
        revision: str | None = None,
        tiny_vae_id: str | None = None,
        loras: tuple = (),
    ) -> ModelIdentity:
        """model_id replaces the preset's whole model (a local folder or merged checkpoint), so the
        preset's extra UNet weights are only used with its own model. tiny_vae_id: None keeps the
        preset's choice, 'none' selects the full VAE."""
        unet = preset.unet_weights if not model_id else None
        if tiny_vae_id is None:
            vae = preset.tiny_vae_id or "full"
        else:
            vae = "full" if tiny_vae_id.lower() in ("", "none", "full") else tiny_vae_id
        options = ",".join(f"{k}={v}" for k, v in preset.scheduler_options)
        return cls(
            preset=preset.name,
            model_id=model_id or preset.model_id,
            revision=revision or "main",
            unet_weights="/".join(unet) if unet else "",
            vae=vae,
            scheduler=f"{preset.scheduler}({options})",
            loras=tuple((spec.name, spec.key) for spec in loras),
        )

    def as_dict(self) -> dict[str, Any]:
        """The base model (styles enter a fingerprint only when a request uses them: lora_sources).
        Once pinned, the commits stand for the revision's name: "main" and the commit it names are one
        model, and "main" after a push is another."""
        model = {key: value for key, value in self.__dict__.items() if key not in ("loras", "commits")}
        if self.commits:
            del model["revision"]
            model["commits"] = dict(self.commits)
        return model

    def commit_of(self, component: str) -> str | None:
        """The resolved commit of model, unet_weights or vae (None: not resolved)."""
        return dict(self.commits).get(component)

    def hub_revision(self, component: str, default: str = "main") -> str:
        """What to load a hub component at: its commit when resolved (exactly what was fingerprinted)."""
        commit = self.commit_of(component)
        return commit if commit and not commit.startswith("sha256:") else default

    def versions(self) -> dict[str, Any]:
        """The weights this identity names, for /models, /healthz and image metadata."""
        return {"model_id": self.model_id, "revision": self.revision, "commit": self.commit_of("model"),
                "unet_weights": self.unet_weights or None, "vae": self.vae, "commits": dict(self.commits)}

    def lora_sources(self, names: list[str]) -> dict[str, str]:
        known = dict(self.loras)
        return {name: known.get(name, "not offered") for name in names}

    @property
    def model_revision(self) -> str:
        """The model's commit when resolved, else its revision's name (image metadata)."""
        return self.commit_of("model") or self.revision

    @property
    def label(self) -> str:
        """Short model name for image metadata and the UI."""
        return self.model_id.rstrip("/").split("/")[-1]
