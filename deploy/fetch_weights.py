"""Fill the shared models volume once: the weights of the configured preset (model, tiny VAE, extra UNet
file) into the Hugging Face cache at HF_HOME, so every later pod starts with HF_HUB_OFFLINE=1 and
downloads nothing. The Kubernetes GPU worker's init container runs it (deploy/kubernetes/gpu-worker.yaml):

    python deploy/fetch_weights.py

Reads the app's own settings (MODEL_PRESET, MODEL_ID, MODEL_REVISION, TINY_VAE_ID). A second run finds
the files in the cache and returns in seconds.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from app import Settings  # noqa: E402
from inference.presets import ModelIdentity, get_preset  # noqa: E402

logger = logging.getLogger("fetch_weights")
# The pipeline loads fp16 files first (half the download); configs, tokenizers and schedulers are small.
PATTERNS = ["*.json", "*.txt", "*.model", "*fp16.safetensors", "tokenizer*/*", "scheduler/*"]


def main() -> int:
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    from huggingface_hub import hf_hub_download, snapshot_download

    settings = Settings.from_env(os.environ)
    preset = get_preset("lightning" if settings.preset == "auto" else settings.preset)
    identity = ModelIdentity.resolve(preset, settings.model_id, settings.model_revision, settings.tiny_vae_id)
    if Path(identity.model_id).is_dir():
        logger.info("MODEL_ID is a local folder (%s): nothing to fetch", identity.model_id)
        return 0
    logger.info("fetching %s@%s", identity.model_id, identity.revision)
    snapshot_download(identity.model_id, revision=identity.revision, allow_patterns=PATTERNS)
    if identity.vae != "full" and not Path(identity.vae).is_dir():
        snapshot_download(identity.vae)
    if preset.unet_weights and identity.unet_weights:
        hf_hub_download(*preset.unet_weights)
    logger.info("weights are in %s", os.environ.get("HF_HOME", "~/.cache/huggingface"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
