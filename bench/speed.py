"""CPU/GPU speed of the presets against the original plan's code path, with the hardware floor.

    python3 -m bench.speed                       # all configurations (about 15 minutes on 2 vCPUs)
    python3 -m bench.speed --configs turbo,turbo+compiled
    python3 -m bench.speed --device cuda         # the GPU run (fp16, 1024x1024)

Builds full-size SDXL models with random weights once under bench/models/ (the real architectures:
cost does not depend on weight values), measures the machine's GEMM ceiling, counts each
configuration's FLOPs (on meta tensors), and times each configuration end to end, from request to
encoded image bytes, in a fresh process (so cold start and peak memory are its own). Prints one table
and writes bench/results/speed-<device>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MODELS = BENCH / "models"
RESULTS = BENCH / "results"
PROMPT = "a mossy stone golem guarding a crystal cave, detailed game art"


@dataclass(frozen=True)
class Config:
    name: str
    preset: str
    size: int
    steps: int
    guidance: float
    plain: bool = False  # the original plan: plain diffusers, float32, full VAE
    tiny_vae: bool = False
    compiled: bool = False  # the UNet as an AOTInductor package (inference/compiled.py), COMPILE=on
    prepack: str = "off"  # PREPACK: the UNet's linears and convolutions on oneDNN-packed weights (inference/prepack.py)

    @property
    def unet_batch(self) -> int:
        return 2 if self.guidance > 1 else 1


CPU_CONFIGS = {
    "original": Config("original", "base", 512, 20, 7.5, plain=True),
    "base": Config("base", "base", 512, 20, 7.5),
    "turbo": Config("turbo", "turbo", 512, 1, 0.0, tiny_vae=True),
    "turbo+prepack": Config("turbo+prepack", "turbo", 512, 1, 0.0, tiny_vae=True, prepack="on"),
    "turbo+compiled": Config("turbo+compiled", "turbo", 512, 1, 0.0, tiny_vae=True, compiled=True),
    "lightning": Config("lightning", "lightning", 1024, 4, 0.0, tiny_vae=True),
    "lightning+prepack": Config("lightning+prepack", "lightning", 1024, 4, 0.0, tiny_vae=True, prepack="on"),
    "base+prepack": Config("base+prepack", "base", 512, 20, 7.5, prepack="on"),
    "lightning+compiled": Config("lightning+compiled", "lightning", 1024, 4, 0.0, tiny_vae=True, compiled=True),
}
GPU_CONFIGS = {
    "original": Config("original", "base", 1024, 20, 7.5, plain=True),
    "base": Config("base", "base", 1024, 20, 7.5),
    "lightning": Config("lightning", "lightning", 1024, 4, 0.0, tiny_vae=True),
}


# ---- hardware ceiling and FLOP floor ----------------------------------------------------------------

def gemm_ceiling(dtype_name: str, device: str, n: int = 4096, repeats: int = 5) -> float:
    """Best large-GEMM rate in GFLOP/s: the ceiling no model step can beat."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def count_flops(config: Config) -> dict[str, float]:
    """GFLOP per image for each component, counted on meta tensors (no memory, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tests.sdxl_builder import full_components

    parts = full_components("meta")
    latent = config.size // 8
    batch = config.unet_batch

    def flops(module, *args, **kwargs) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args, **kwargs)
        return counter.get_total_flops() / 1e9

    with torch.device("meta"):
        tokens = torch.zeros(1, 77, dtype=torch.long)
        unet_args = (torch.zeros(batch, 4, latent, latent), torch.tensor(999),
                     torch.zeros(batch, 77, 2048))
        added = {"text_embeds": torch.zeros(batch, 1280), "time_ids": torch.zeros(batch, 6)}
        decoder = parts["taesd"].decoder if config.tiny_vae else parts["vae"].decode
        counted = {
            "text_encoders": flops(parts["text_encoder"], tokens) + flops(parts["text_encoder_2"], tokens),
            "unet_per_step": flops(parts["unet"], *unet_args, added_cond_kwargs=added),
            "decode": flops(decoder, torch.zeros(1, 4, latent, latent)),
        }
    counted["total"] = counted["text_encoders"] + config.steps * counted["unet_per_step"] + counted["decode"]
    return counted


def cpu_line() -> str:
    """The CPU and its matrix units, printed above every CPU figure: they are read against it."""
    from inference.compiled import cpu_description

    cpu = cpu_description()
    return f"CPU: {cpu['model']} ({cpu['cpus']} CPUs), matrix units: {', '.join(cpu['matrix_units']) or 'none'}"


def full_unet_on_this_machine(dtype=None):
    """The full-size SDXL UNet (random weights, built once under bench/models) in dtype (bf16 unless
    told), after printing
    the CPU, its matrix units, torch and its threads: every CPU figure is read against these."""
    import torch
    from diffusers import UNet2DConditionModel

    from tests.sdxl_builder import build_full_sdxl

    build_full_sdxl(MODELS)
    print(f"{cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    return UNet2DConditionModel.from_pretrained(MODELS / "sdxl" / "unet", torch_dtype=dtype or torch.bfloat16).eval()


# ---- one configuration, in its own process ------------------------------------------------------------

def run_child(config: Config, device: str, runs: int) -> dict:
    started_process = time.time()
    import torch

    compiled = None

    models = MODELS
    if config.plain:
        from diffusers import StableDiffusionXLPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(models / "sdxl", torch_dtype=dtype).to(device)
        ready = time.time()

        def make_image() -> bytes:
            image = pipe(PROMPT, height=config.size, width=config.size, num_inference_steps=config.steps,
                         guidance_scale=config.guidance, generator=torch.Generator("cpu").manual_seed(0)).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
        dtype_name = str(dtype)
    else:
        from inference.images import encode, parameters_text
        from inference.pipeline import ImagePipeline, LoadOptions
        from inference.presets import ModelIdentity, get_preset
        from inference.request import GenerationRequest

        preset = get_preset(config.preset)
        vae = str(models / "taesd") if config.tiny_vae else "none"
        identity = ModelIdentity.resolve(preset, str(models / "sdxl"), None, vae)
        pipeline = ImagePipeline(LoadOptions(preset, identity, device=device, warmup=True,
                                             compile="on" if config.compiled else "off",
                                             compile_cache=models / "compile-cache", prepack=config.prepack))
        pipeline.load()
        ready = time.time()  # serving (eager) from here
        if pipeline.compiled is not None:
            while pipeline.compiled.state in ("eager", "compiling"):
                time.sleep(0.2)
            compiled = {**pipeline.compiled.describe(), "after_start_s": time.time() - started_process}
            if compiled["state"] != "compiled":
                raise RuntimeError(f"compile failed: {compiled['detail']}")
        request = GenerationRequest.create(PROMPT, preset=config.preset, width=config.size, height=config.size,
                                           steps=config.steps, guidance_scale=config.guidance, seed=0)

        def make_image() -> bytes:
            image = pipeline.generate(request, on_step=lambda s, t: None, should_cancel=lambda: False)
            return encode(image, "png", parameters_text(request, preset.sampler_label, identity.label))
        dtype_name = str(pipeline.dtype)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        data = make_image()
        times.append(time.perf_counter() - t0)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result = {"config": asdict(config), "dtype": dtype_name.removeprefix("torch."), "seconds": min(times),
              "all_seconds": times, "cold_start_s": ready - started_process, "peak_rss_gb": peak_gb,
              "png_bytes": len(data), "compiled": compiled}
    if device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


def build_compiled_package(config: Config) -> float:
    """`python app.py --compile` for the config's model (a process holding only the UNet: an in-app
    build next to the whole pipeline needs more memory than a 24 GB machine has). Seconds the process took
    (only its model load when the package is already in the cache)."""
    env = {**os.environ, "MODEL_ID": str(MODELS / "sdxl"), "TINY_VAE_ID": str(MODELS / "taesd"),
           "MODEL_PRESET": config.preset, "DEVICE": "cpu", "COMPILE_CACHE_DIR": str(MODELS / "compile-cache")}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "app.py", "--compile"], cwd=BENCH.parent, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"compile for {config.name} failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - started


def run_in_subprocess(config: Config, device: str, runs: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.speed", "--child", config.name, "--device", device,
                          "--runs", str(runs)], cwd=BENCH.parent, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{config.name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the table ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=0, help="timed runs per config (default 3 if fast, else 1)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    table = GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    if args.child:
        print(json.dumps(run_child(table[args.child], args.device, max(1, args.runs))))
        return

    from tests.sdxl_builder import build_full_sdxl

    started = time.perf_counter()
    build_full_sdxl(MODELS)
    print(f"models ready in {time.perf_counter() - started:.0f} s under {MODELS}", flush=True)
    from inference.compiled import cpu_description

    cpu = cpu_description()
    print(cpu_line(), flush=True)
    # Measured for the dtypes the configurations run in, when first needed: a dtype the CPU has no
    # units for (bf16 on an AVX2-only CPU: under 1 GFLOP/s) would take a quarter of an hour to time.
    ceilings: dict[str, float] = {}
    names = [n for n in (args.configs.split(",") if args.configs else table)]
    rows = []
    for name in names:
        config = table[name]
        runs = args.runs or (3 if config.steps * config.size**2 <= 4 * 512**2 else 1)
        build_s = build_compiled_package(config) if config.compiled else None
        measured = run_in_subprocess(config, args.device, runs)
        measured["package_build_s"] = build_s
        flops = count_flops(config)
        if measured["dtype"] not in ceilings:
            ceilings[measured["dtype"]] = gemm_ceiling(measured["dtype"], args.device)
            print(f"GEMM ceiling {measured['dtype']}: {ceilings[measured['dtype']]:.0f} GFLOP/s", flush=True)
        ceiling = ceilings[measured["dtype"]]
        measured.update(gflop=flops, floor_s=flops["total"] / ceiling, ceiling_gflops=ceiling)
        measured["ratio_to_floor"] = measured["seconds"] / measured["floor_s"]
        rows.append(measured)
        print(f"{name}: {measured['seconds']:.1f} s ({measured['ratio_to_floor']:.2f}x floor), "
              f"cold start {measured['cold_start_s']:.1f} s, peak {measured['peak_rss_gb']:.1f} GB", flush=True)
    original = next((r["seconds"] for r in rows if r["config"]["name"] == "original"), None)
    for row in rows:
        row["speedup_vs_original"] = original / row["seconds"] if original else None
    print_table(rows, args.device)
    RESULTS.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
               "cpu": cpu, "device": args.device, "ceilings_gflops": ceilings}
    (RESULTS / f"speed-{args.device}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


def print_table(rows: list[dict], device: str) -> None:
    header = (f"{'config':<10} {'dtype':<9} {'size':>9} {'steps':>5} {'cfg':>4} {'seconds':>8} {'floor s':>8} "
              f"{'x floor':>7} {'speed-up':>8} {'cold s':>7} {'peak GB':>7} {'compiled after s':>16}")
    print(f"\ndevice: {device}\n{header}\n{'-' * len(header)}")
    for r in rows:
        c = r["config"]
        speedup = f"{r['speedup_vs_original']:.2f}x" if r["speedup_vs_original"] else "-"
        print(f"{c['name']:<10} {r['dtype']:<9} {c['size']:>4}x{c['size']:<4} {c['steps']:>5} {c['guidance']:>4g} "
              f"{r['seconds']:>8.2f} {r['floor_s']:>8.2f} {r['ratio_to_floor']:>7.2f} {speedup:>8} "
              f"{r['cold_start_s']:>7.1f} {r['peak_rss_gb']:>7.1f} {_compiled_cell(r.get('compiled')):>16}")


def _compiled_cell(compiled: dict | None) -> str:
    if not compiled:
        return "-"
    return f"{compiled['after_start_s']:.0f} ({compiled['source']})"


if __name__ == "__main__":
    main()
