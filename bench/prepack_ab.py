"""Prepacked linears against plain eager, one UNet step at a time, alternating in one process.

    python3 -m bench.prepack_ab [--size 512] [--rounds 5] [--dtype bfloat16|float32]

Shared vCPUs change speed from one minute to the next (the bf16 GEMM ceiling of one 2-vCPU AMX Xeon
measured 546, 1362 and 1483 GFLOP/s within hours), so two processes timed minutes apart can disagree by
more than the effect. This loads the full-size UNet (random weights, bench/models) in the dtype the app
picks on this CPU, prepacks it (inference/prepack.py, as PREPACK does), and alternates: ceiling, plain
step, packed step, per round. In bf16 the plain side is a second copy (packed linears drop their plain
weights); in float32 only convolutions are packed and keep theirs, so one copy runs both ways (20 GB of
float32 weights would not fit twice). Prints the CPU and its matrix units, each round, and the
packed/plain ratio per round and overall.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.speed import full_unet_on_this_machine, gemm_ceiling
from inference.pipeline import pick_dtype
from inference.prepack import PackedConv2d, prepack_unet


def unet_arguments(size: int, dtype: torch.dtype = torch.bfloat16) -> tuple[tuple, dict]:
    latent = size // 8
    return ((torch.randn(1, 4, latent, latent, dtype=dtype), torch.tensor(999.0)),
            {"encoder_hidden_states": torch.randn(1, 77, 2048, dtype=dtype),
             "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, dtype=dtype),
                                   "time_ids": torch.randn(1, 6, dtype=dtype)}})


def timed_step(unet, args: tuple, kwargs: dict, packed: bool | None = None) -> tuple[float, torch.Tensor]:
    """packed: switch the UNet's packed convolutions on or off first (None: leave them)."""
    if packed is not None:
        for module in unet.modules():
            if isinstance(module, PackedConv2d):
                module.use_packed = packed
    started = time.perf_counter()
    output = unet(*args, **kwargs).sample
    return time.perf_counter() - started, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default=str(pick_dtype("auto", "cpu")).removeprefix("torch."),
                        choices=["bfloat16", "float32"], help="default: what the app picks on this CPU")
    options = parser.parse_args()
    dtype = getattr(torch, options.dtype)
    packed = full_unet_on_this_machine(dtype)
    # float32: one copy, its packed convolutions switched off for the plain step (linears are not packed).
    plain, plain_switch = (full_unet_on_this_machine(dtype), None) if dtype == torch.bfloat16 else (packed, False)
    packed_switch = None if plain_switch is None else True
    print(prepack_unet(packed, (options.size // 8, options.size // 8), dtype=dtype))
    args, kwargs = unet_arguments(options.size, dtype)
    ratios, plain_times, packed_times = [], [], []
    with torch.inference_mode():
        _, reference = timed_step(plain, args, kwargs, plain_switch)  # warm-up of both: primitive caches
        _, output = timed_step(packed, args, kwargs, packed_switch)
        print(f"max |packed - plain| {(output - reference).abs().max().item():.2e} "
              f"(output max {reference.abs().max().item():.2e})")
        for round_number in range(1, options.rounds + 1):
            ceiling = gemm_ceiling(options.dtype, "cpu", repeats=2)
            plain_s, _ = timed_step(plain, args, kwargs, plain_switch)
            packed_s, _ = timed_step(packed, args, kwargs, packed_switch)
            plain_times.append(plain_s)
            packed_times.append(packed_s)
            ratios.append(plain_s / packed_s)
            print(f"round {round_number}: ceiling {ceiling:5.0f} GFLOP/s  plain {plain_s:6.2f} s  "
                  f"packed {packed_s:6.2f} s  speed-up {plain_s / packed_s:5.2f}x")
    print(f"\nUNet step at {options.size}²: plain min {min(plain_times):.2f} s, packed min {min(packed_times):.2f} s; "
          f"speed-up per round median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x), "
          f"of the minima {min(plain_times) / min(packed_times):.2f}x")


if __name__ == "__main__":
    main()
