"""How close the SDXL UNet's own matrix shapes get to the CPU's GEMM ceiling, eager against prepacked.

    python3 -m bench.gemm_shapes [--size 512] [--batch 1] [--repeats 10]

The speed floor in bench.speed divides the UNet's FLOPs by one big square GEMM's throughput. The UNet
does not run big square GEMMs: at 512² its linears are 1024x640 and 256x1280 activations against
640..10240-wide weights. This records every nn.Linear and nn.Conv2d call of one step of the full-size
UNet (random weights, bench/models, bf16), then times each distinct shape alone: eager (what the app
runs), and with the weight prepacked for oneDNN (mkldnn._reorder_linear_weight with the call's row
count, _reorder_convolution_weight with channels-last input: what inductor's freezing does). It prints
the CPU and its matrix units, the ceiling, each shape's GFLOP/s, and the step's linear and convolution
time summed over calls against the ceiling's floor for the same FLOPs: the part of the gap to the floor
that the shapes alone explain.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import torch

from bench.speed import full_unet_on_this_machine, gemm_ceiling


def best_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    call()  # primitive caches, allocator
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def record_shapes(unet, size: int, batch: int) -> tuple[Counter, Counter, dict]:
    """(linear (rows, in, out, bias) -> calls, conv key -> calls, conv key -> module) for one UNet step."""
    linears, convs, modules = Counter(), Counter(), {}

    def on_linear(module, inputs, _output):
        x = inputs[0]
        linears[(x.numel() // x.shape[-1], module.in_features, module.out_features, module.bias is not None)] += 1

    def on_conv(module, inputs, _output):
        key = (tuple(inputs[0].shape), module.in_channels, module.out_channels, module.kernel_size, module.stride,
               module.padding)
        convs[key] += 1
        modules.setdefault(key, module)

    hooks = [m.register_forward_hook(on_linear) for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(on_conv) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    latent, dtype = size // 8, torch.bfloat16
    with torch.inference_mode():
        unet(torch.randn(batch, 4, latent, latent, dtype=dtype), torch.tensor(999.0),
             encoder_hidden_states=torch.randn(batch, 77, 2048, dtype=dtype),
             added_cond_kwargs={"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                "time_ids": torch.randn(batch, 6, dtype=dtype)})
    for hook in hooks:
        hook.remove()
    return linears, convs, modules


def time_linear(rows: int, k: int, n: int, bias: bool, repeats: int) -> tuple[float, float]:
    layer = torch.nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, rows)
    with torch.inference_mode():
        eager = best_ms(lambda: layer(x), repeats)
        prepacked = best_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], ""),
                            repeats)
    return eager, prepacked


def time_conv(key: tuple, module: torch.nn.Conv2d, repeats: int) -> tuple[float, float]:
    shape = key[0]
    x = torch.randn(*shape, dtype=torch.bfloat16)
    x_last = x.contiguous(memory_format=torch.channels_last)
    args = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
    packed = torch.ops.mkldnn._reorder_convolution_weight(module.weight, *args, list(shape))
    with torch.inference_mode():
        eager = best_ms(lambda: module(x), repeats)
        prepacked = best_ms(lambda: torch.ops.mkldnn._convolution_pointwise(
            x_last, packed, module.bias, *args, "none", [], ""), repeats)
    return eager, prepacked


def conv_flops(key: tuple) -> float:
    (batch, _, height, width), cin, cout, kernel, stride, _ = key
    return 2.0 * batch * cin * cout * kernel[0] * kernel[1] * (height // stride[0]) * (width // stride[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="2 for classifier-free guidance (base preset)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    unet = full_unet_on_this_machine()
    ceiling = gemm_ceiling("bfloat16", "cpu")
    print(f"bf16 GEMM ceiling (4096³): {ceiling:.0f} GFLOP/s")
    linears, convs, modules = record_shapes(unet, args.size, args.batch)
    print(f"\none UNet step at {args.size}², batch {args.batch}: {sum(linears.values())} linear calls "
          f"({len(linears)} shapes), {sum(convs.values())} convolutions ({len(convs)} shapes)\n")
    print(f"{'op':<34} {'calls':>5} {'eager ms':>9} {'GFLOP/s':>8} {'packed ms':>9} {'GFLOP/s':>8}")
    totals = {"linear": [0.0, 0.0, 0.0], "convolution": [0.0, 0.0, 0.0]}  # eager ms, packed ms, GFLOP
    for (rows, k, n, bias), calls in sorted(linears.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2]):
        eager, packed = time_linear(rows, k, n, bias, args.repeats)
        gflop = 2.0 * rows * k * n / 1e9
        print(f"{f'linear {rows}x{k} @ {k}x{n}':<34} {calls:>5} {eager:9.3f} {gflop / eager * 1e3:8.0f} "
              f"{packed:9.3f} {gflop / packed * 1e3:8.0f}")
        for index, value in enumerate((eager, packed, gflop)):
            totals["linear"][index] += calls * value
    for key, calls in sorted(convs.items(), key=lambda item: -conv_flops(item[0])):
        eager, packed = time_conv(key, modules[key], args.repeats)
        gflop = conv_flops(key) / 1e9
        label = f"conv {key[1]}->{key[2]} k{key[3][0]} s{key[4][0]} {key[0][2]}x{key[0][3]}"
        print(f"{label:<34} {calls:>5} {eager:9.3f} {gflop / eager * 1e3:8.0f} {packed:9.3f} "
              f"{gflop / packed * 1e3:8.0f}")
        for index, value in enumerate((eager, packed, gflop)):
            totals["convolution"][index] += calls * value
    print()
    for name, (eager, packed, gflop) in totals.items():
        floor = gflop / ceiling * 1e3
        print(f"{name:<12} per step: eager {eager / 1e3:.3f} s ({eager / floor:.2f}x its floor), prepacked "
              f"{packed / 1e3:.3f} s ({packed / floor:.2f}x), floor {floor / 1e3:.3f} s for {gflop:.0f} GFLOP; "
              f"prepacking buys {eager / packed:.2f}x")


if __name__ == "__main__":
    main()
