"""What a live preview costs against the step it rides on: full-size UNet and TAESD (random weights,
bench/models), bf16, on this machine.

    python3 -m bench.preview [--sizes 512,1024] [--repeats 3]

In the dtype the app picks on this CPU (bf16 with AVX512-BF16 or AMX, else fp32). Per size: one UNet step (batch 1, as turbo/lightning run it: the cheapest step, so the worst ratio; SDXL
base with guidance runs batch 2, twice the step), one preview (the latents downsampled to at most 256 px,
TAESD decode, JPEG), and the overhead per step at PREVIEW_EVERY_STEPS = 1, 2 and 4. The target: under 5%
of a step at the default.
"""

from __future__ import annotations

import argparse

import torch

from bench.decode import best_of
from bench.prepack_ab import unet_arguments
from bench.speed import MODELS, full_unet_on_this_machine
from inference.preview import PreviewDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from diffusers import AutoencoderTiny

    from inference.pipeline import pick_dtype

    dtype = pick_dtype("auto", "cpu")  # what the app runs here: bf16 only with AVX512-BF16 or AMX
    print(f"dtype: {dtype}", flush=True)
    unet = full_unet_on_this_machine().to(dtype)
    taesd = AutoencoderTiny.from_pretrained(MODELS / "taesd", torch_dtype=dtype).eval()
    decoder = PreviewDecoder(taesd.to(memory_format=torch.channels_last))
    print(f"{'size':>6} {'UNet step s':>12} {'preview s':>10} {'preview/step':>13} "
          f"{'per step @1':>12} {'@2':>7} {'@4':>7}", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        unet_args, unet_kwargs = unet_arguments(size, dtype)
        with torch.inference_mode():
            step = best_of(lambda: unet(*unet_args, **unet_kwargs), args.repeats)
        latents = torch.randn(1, 4, size // 8, size // 8, dtype=dtype)
        preview = best_of(lambda: decoder(latents), args.repeats + 2)
        ratio = preview / step
        print(f"{size:>6} {step:>12.3f} {preview:>10.3f} {ratio:>12.1%} {ratio:>12.1%} {ratio / 2:>7.1%} "
              f"{ratio / 4:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
