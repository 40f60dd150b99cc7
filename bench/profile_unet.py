"""Where one SDXL UNet step spends its time, eager against compiled (the op-by-op view of bench.speed).

    python3 -m bench.profile_unet [--size 512] [--top 12]

Full-size UNet with random weights (bench/models), bf16, batch 1 (turbo/lightning run without
guidance). Prints the CPU and its matrix units, then for each variant the step time and the ops that
take it, grouped into linear (addmm/mm/linear), convolution, attention, normalisation, copies and the
rest, with their share of the step. The compiled variant is `inference.compiled.CompiledUNet`, exactly
what the app runs (the package bench.speed's turbo+compiled row built, under bench/models/compile-cache).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict

import torch

from bench.speed import MODELS, cpu_line
from inference.compiled import CompiledUNet, compile_cache_dir

GROUPS = (
    ("linear", ("addmm", "aten::mm", "linear", "mkl_linear", "_linear_pointwise", "qlinear")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("attention", ("attention", "flash", "sdpa", "bmm", "baddbmm", "softmax")),
    ("normalisation", ("norm",)),
    ("copies", ("copy", "contiguous", "clone", "to_dense", "reorder", "cat", "permute", "transpose")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, needles in GROUPS if any(n in lowered for n in needles)), "other")


def unet_call(latent: int) -> tuple[tuple, dict]:
    dtype = torch.bfloat16
    return ((torch.randn(1, 4, latent, latent, dtype=dtype), torch.tensor(999.0)),
            {"encoder_hidden_states": torch.randn(1, 77, 2048, dtype=dtype), "timestep_cond": None,
             "cross_attention_kwargs": None, "return_dict": False,
             "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, dtype=dtype),
                                   "time_ids": torch.randn(1, 6, dtype=dtype)}})


def profile(unet, args, kwargs, top: int) -> tuple[float, list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        unet(*args, **kwargs)
        started = time.perf_counter()
        unet(*args, **kwargs)
        step = time.perf_counter() - started
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            unet(*args, **kwargs)
    totals: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        totals[group_of(event.key)] += event.self_cpu_time_total
        ops.append((event.key, event.self_cpu_time_total))
    whole = sum(totals.values()) or 1.0
    shares = sorted(((g, t / whole) for g, t in totals.items()), key=lambda item: -item[1])
    ops.sort(key=lambda item: -item[1])
    print("  top ops: " + ", ".join(f"{name} {t / whole:.0%}" for name, t in ops[:top]))
    return step, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from tests.sdxl_builder import build_full_sdxl

    build_full_sdxl(MODELS)
    print(cpu_line())
    unet = UNet2DConditionModel.from_pretrained(MODELS / "sdxl" / "unet", torch_dtype=torch.bfloat16).eval()
    call_args, call_kwargs = unet_call(args.size // 8)
    print(f"\neager, {args.size}x{args.size}:")
    eager_step, eager_shares = profile(unet, call_args, call_kwargs, args.top)
    print(f"  step {eager_step:.3f} s; " + ", ".join(f"{g} {s:.0%}" for g, s in eager_shares))

    # The folder bench.speed's turbo+compiled row fills (the app's key for this model): loaded, not rebuilt.
    cache = compile_cache_dir(MODELS / "compile-cache", f"{MODELS / 'sdxl'}@main unet=", torch.bfloat16)
    compiled = CompiledUNet(unet, cache, latent_size=(args.size // 8, args.size // 8))
    with torch.inference_mode():
        unet(*call_args, **call_kwargs)  # the template the compile uses (the warm-up's role in the app)
    compiled.build_in_background(threading.Lock()).join()
    print(f"\ncompiled ({compiled.describe()['detail']}):")
    step, shares = profile(unet, call_args, call_kwargs, args.top)
    print(f"  step {step:.3f} s ({eager_step / step:.2f}x eager); " + ", ".join(f"{g} {s:.0%}" for g, s in shares))


if __name__ == "__main__":
    main()
