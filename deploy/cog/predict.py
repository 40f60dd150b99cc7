"""The generator as a Cog model: the app's own request validation, pipeline and image encoding behind
Cog's prediction API, so a Replicate deployment or a self-hosted Cog server makes the same image (same
PNG/WebP parameters, same pixels on the same device type) as a Space for the same request.

Model settings come from the same environment variables as the app (MODEL_PRESET, MODEL_ID,
MODEL_REVISION, TINY_VAE_ID, DEVICE, DTYPE), read by app.Settings. Progress is printed as
`step N/M` log lines, which the app's remote backend reads as the job's progress.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path as LocalPath
from typing import Optional

from cog import BasePredictor, Input, Path

sys.path.insert(0, str(LocalPath(__file__).resolve().parents[2]))  # the repository root: app, inference

from app import Settings, build_pipeline  # noqa: E402
from inference.errors import GenerationError  # noqa: E402
from inference.images import encode, parameters_text  # noqa: E402
from inference.request import OUTPUT_FORMATS, GenerationRequest  # noqa: E402

DERIVED_SEED = -1  # as in the app's API: derive the seed from the other fields


class Predictor(BasePredictor):
    def setup(self) -> None:
        settings = Settings.from_env(os.environ)
        self.pipeline, self.preset, self.identity = build_pipeline(settings)
        self.pipeline.load()  # raises ModelUnavailable with the variable to fix

    def predict(
        self,
        prompt: str = Input(description="What to draw, up to 2000 characters."),
        negative_prompt: str = Input(description="What to avoid; may be empty.", default=""),
        preset: str = Input(description="The preset this model serves; empty for that one.", default=""),
        width: Optional[int] = Input(description="A multiple of 8 in 256..2048; empty for the preset's.",
                                     default=None),
        height: Optional[int] = Input(description="A multiple of 8 in 256..2048; empty for the preset's.",
                                      default=None),
        steps: Optional[int] = Input(description="Denoising steps; empty for the preset's.", default=None),
        guidance_scale: Optional[float] = Input(description="0..20; empty for the preset's.", default=None),
        seed: int = Input(description="-1 derives it from the other fields, else 0..4294967295.",
                          default=DERIVED_SEED),
        output_format: str = Input(description="png or webp.", default="png", choices=list(OUTPUT_FORMATS)),
    ) -> Path:
        request = self._request(prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                                output_format)
        image = self.pipeline.generate(request, on_step=_print_step, should_cancel=lambda: False)
        data = encode(image, request.output_format,
                      parameters_text(request, self.preset.sampler_label, self.identity.label,
                                      self.identity.commit_of("model") or ""))
        out = Path(tempfile.mkdtemp()) / f"image.{request.output_format}"
        out.write_bytes(data)
        return out

    def _request(self, prompt, negative_prompt, preset, width, height, steps, guidance_scale, seed,
                 output_format) -> GenerationRequest:
        preset = preset or self.preset.name
        if preset != self.preset.name:
            raise ValueError(f"preset: {preset!r} is not loaded here; this model serves {self.preset.name!r}")
        try:
            return GenerationRequest.create(prompt, negative_prompt, preset, width, height, steps, guidance_scale,
                                            None if seed == DERIVED_SEED else seed, output_format)
        except GenerationError as error:  # the same message the app gives, naming the field
            raise ValueError(str(error)) from None


def _print_step(step: int, total: int) -> None:
    print(f"step {step}/{total}", flush=True)  # Cog streams stdout into the prediction's logs
