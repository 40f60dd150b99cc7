"""Keeps the benchmark code runnable in CI, on the tiny pipeline. Timings are printed, never asserted."""

from __future__ import annotations

import pytest

from bench import speed


@pytest.fixture
def tiny_models(tiny_model, monkeypatch):
    # The benchmark reads its models from one folder (sdxl/ and taesd/ inside): point it at the tiny ones.
    monkeypatch.setattr(speed, "MODELS", tiny_model.sdxl.parent)
    return tiny_model


@pytest.mark.parametrize("name", ["original", "turbo"])
def test_one_configuration_runs_end_to_end(tiny_models, name: str) -> None:
    config = speed.CPU_CONFIGS[name]
    small = speed.Config(config.name, config.preset, 256, min(config.steps, 2), config.guidance, config.plain,
                         config.tiny_vae)
    result = speed.run_child(small, "cpu", runs=1)
    assert result["seconds"] > 0 and result["png_bytes"] > 0 and result["peak_rss_gb"] > 0
    assert result["dtype"] in ("float32", "bfloat16")


def test_flop_count_matches_the_known_sdxl_figures() -> None:
    # Full-size shapes on meta tensors: no memory, no time. The design notes measured 1,589 GFLOP per
    # UNet step at 512x512 and 6,761 at 1024x1024.
    flops = speed.count_flops(speed.CPU_CONFIGS["turbo"])
    assert 1500 < flops["unet_per_step"] < 1700
    big = speed.count_flops(speed.CPU_CONFIGS["lightning"])
    assert 6500 < big["unet_per_step"] < 7000


def test_table_prints(capsys) -> None:
    row = {"config": {"name": "turbo", "size": 512, "steps": 1, "guidance": 0.0}, "dtype": "bfloat16",
           "seconds": 5.0, "floor_s": 4.5, "ratio_to_floor": 1.11, "speedup_vs_original": 80.0,
           "cold_start_s": 12.0, "peak_rss_gb": 7.5}
    speed.print_table([row], "cpu")
    assert "turbo" in capsys.readouterr().out
    assert speed.gemm_ceiling("bfloat16", "cpu", n=256, repeats=1) > 0
