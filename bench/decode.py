"""Which decoder settings pay off on CPU: TAESD and the full SDXL VAE at 512x512 (bench/models).

    python3 -m bench.decode

Conv-heavy decoders are where CPU memory layout matters (oneDNN prefers channels-last); the UNet is
dominated by GEMMs and does not care (bench/ablate.py). Prints seconds per decode per setting.
"""

from __future__ import annotations

import time

import torch

from bench.speed import MODELS


def best_of(fn, repeats: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    latents = torch.randn(1, 4, 64, 64)
    for name, cls, folder in (("TAESD", AutoencoderTiny, MODELS / "taesd"),
                              ("full VAE", AutoencoderKL, MODELS / "sdxl" / "vae")):
        for dtype in (torch.bfloat16, torch.float32):
            model = cls.from_pretrained(folder, torch_dtype=dtype).eval()
            for layout in (torch.contiguous_format, torch.channels_last):
                model.to(memory_format=layout)
                x = latents.to(dtype)
                with torch.inference_mode():
                    seconds = best_of(lambda: model.decode(x))
                print(f"{name:<9} {str(dtype).removeprefix('torch.'):<9} {str(layout).removeprefix('torch.'):<18} "
                      f"{seconds:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
