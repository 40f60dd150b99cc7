"""Live previews: the latents of a running generation, decoded small by the tiny VAE (TAESD).

A preview is a JPEG of at most PREVIEW_MAX_SIDE pixels a side: the latents are downsampled first (TAESD's
cost grows with the pixels it makes), so a preview costs a fraction of a UNet step (bench/preview.py).
"""

from __future__ import annotations

import io
import logging

import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 256
LATENT_SCALE = 8  # SDXL's VAE: one latent pixel is 8x8 image pixels
JPEG_QUALITY = 70


class PreviewDecoder:
    def __init__(self, vae: torch.nn.Module, max_side: int = PREVIEW_MAX_SIDE) -> None:
        self.vae, self.max_side = vae, max_side

    def __call__(self, latents: torch.Tensor) -> bytes | None:
        """JPEG bytes of the first image in the batch, or None for latents TAESD cannot read (packed
        transformer latents: FLUX)."""
        if latents.ndim != 4 or latents.shape[1] != 4:
            return None
        with torch.inference_mode():
            small = self._downsampled(latents[:1])
            pixels = self.vae.decode(small.to(self.vae.dtype)).sample[0]
        array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def _downsampled(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        longest = max(height, width) * LATENT_SCALE
        if longest <= self.max_side:
            return latents
        factor = self.max_side / longest
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        return F.interpolate(latents.float(), size=size, mode="bilinear", antialias=True)

