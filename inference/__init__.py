"""Turning a validated GenerationRequest into an image. Only pipeline.py imports torch/diffusers."""
