"""Which CPU ideas pay off: one SDXL UNet step at 512x512 (batch 1, as turbo/lightning run it).

    python3 -m bench.ablate [--compile]

Times the full-size UNet (random weights, bench/models) in fp32 and bf16 (weights cast vs autocast),
with channels_last, with fused QKV projections, and optionally with torch.compile (compile time reported
separately). Prints seconds per step and the ratio to the bf16 baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.speed import MODELS, gemm_ceiling


def unet_inputs(dtype: torch.dtype, latent: int = 64) -> tuple:
    return ((torch.randn(1, 4, latent, latent, dtype=dtype), torch.tensor(999), torch.randn(1, 77, 2048, dtype=dtype)),
            {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, dtype=dtype),
                                   "time_ids": torch.randn(1, 6, dtype=dtype)}})


def time_step(unet, dtype: torch.dtype, repeats: int, autocast: bool = False) -> float:
    args, kwargs = unet_inputs(dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    best = float("inf")
    with torch.inference_mode(), context:
        unet(*args, **kwargs)  # warm-up: allocator, oneDNN primitive caches
        for _ in range(repeats):
            started = time.perf_counter()
            unet(*args, **kwargs)
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    parser.add_argument("--fp32", action="store_true", help="also time fp32 and autocast (slow)")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    print(f"threads {torch.get_num_threads()}, GEMM ceiling bf16 {gemm_ceiling('bfloat16', 'cpu'):.0f} GFLOP/s")
    unet = UNet2DConditionModel.from_pretrained(MODELS / "sdxl" / "unet", torch_dtype=torch.bfloat16).eval()
    results: dict[str, float] = {"bf16 weights": time_step(unet, torch.bfloat16, args.repeats)}
    unet.to(memory_format=torch.channels_last)
    results["bf16 + channels_last"] = time_step(unet, torch.bfloat16, args.repeats)
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    results["bf16 + fused QKV"] = time_step(unet, torch.bfloat16, args.repeats)
    unet.to(memory_format=torch.channels_last)
    results["bf16 + fused QKV + channels_last"] = time_step(unet, torch.bfloat16, args.repeats)
    if args.compile:
        compiled = torch.compile(unet)
        started = time.perf_counter()
        time_step(compiled, torch.bfloat16, 0)
        results["torch.compile: compile (s, once)"] = time.perf_counter() - started
        results["bf16 + fused + channels_last + compile"] = time_step(compiled, torch.bfloat16, args.repeats)
    if args.fp32:
        unet.unfuse_qkv_projections()
        unet = unet.to(torch.float32).to(memory_format=torch.contiguous_format)
        results["fp32 weights + bf16 autocast"] = time_step(unet, torch.float32, 1, autocast=True)
        results["fp32 weights"] = time_step(unet, torch.float32, 1)
    base = results["bf16 weights"]
    for name, seconds in results.items():
        ratio = "" if "compile (s" in name else f"{seconds / base:.2f}x of bf16 baseline"
        print(f"{name:<42} {seconds:7.2f} s  {ratio}")


if __name__ == "__main__":
    main()
