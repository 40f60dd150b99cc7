"""Builds SDXL pipelines offline with the real diffusers/transformers classes.

`tiny` configs make tests fast; `full` configs have the real SDXL shapes (random weights), so
benchmarks measure real speed without downloading anything. Both are saved with
`save_pretrained` and loaded back by the app's own loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: Path, ascii_first: bool = False) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): every text tokenizes, offline. ascii_first puts
    the ASCII characters and the special tokens at the lowest ids (see build_tiny_sdxl)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    if ascii_first:
        ascii_chars, other = chars[:128], chars[128:]
        tokens = (ascii_chars + [c + "</w>" for c in ascii_chars] + list(CLIP_SPECIAL_TOKENS) + other
                  + [c + "</w>" for c in other])
    else:
        tokens = chars + [c + "</w>" for c in chars] + list(CLIP_SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77
    )


def _tiny_text_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="gelu",
    )


def _tiny_unet() -> UNet2DConditionModel:
    # cross_attention_dim = hidden sizes of both text encoders (32 + 32);
    # projection input = 6 time ids x addition_time_embed_dim (8) + pooled text embeds (32).
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks give the real SDXL downsampling factor of 8.
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1, sample_size=64,
    )


def _tiny_taesd() -> AutoencoderTiny:
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    )


def build_tiny_sdxl(folder: Path, seed: int = 0, ascii_only: bool = False) -> Path:
    """Save a tiny SDXL pipeline under folder/sdxl and a tiny TAESD under folder/taesd.

    ascii_only: the text encoders know only the ASCII tokens, so any prompt with another character
    fails inside the pipeline, every time, with a real error (the fault tests' "request that always
    crashes"); ASCII prompts work."""
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(folder / "_tokenizer", ascii_first=ascii_only)
    bos, eos = tokenizer.convert_tokens_to_ids(list(CLIP_SPECIAL_TOKENS))
    vocab_size = eos + 1 if ascii_only else len(tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config(vocab_size, bos, eos)),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(vocab_size, bos, eos)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_tiny_unet(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            timestep_spacing="leading", steps_offset=1,
        ),
    )
    pipe.save_pretrained(folder / "sdxl")
    _tiny_taesd().save_pretrained(folder / "taesd")
    return folder / "sdxl"


# ---- full size: the real SDXL shapes, random weights ---------------------------------------------------

FULL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FULL_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  projection_dim=1280, hidden_act="gelu")


def full_text_config(shape: dict) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **shape)


def full_components(device: str = "cpu") -> dict:
    """The SDXL modules with their real shapes; on "meta" they cost no memory (for FLOP counting)."""
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**FULL_UNET),
            "vae": AutoencoderKL(**FULL_VAE),
            "text_encoder": CLIPTextModel(full_text_config(CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(full_text_config(CLIP_BIG_G)),
            "taesd": AutoencoderTiny(),
        }


def _materialize(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Built on meta, filled with small random values in place: 5 GB in bf16 instead of 10 GB of fp32
    # default init. Speed does not depend on the values (no NaN/inf: std 0.02 keeps activations tame).
    module = module.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for name, buffer in module.named_buffers():
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return module


def build_full_sdxl(folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a full-size SDXL (2.57 B parameter UNet, both text encoders, VAE) under folder/sdxl and a
    full-size TAESD under folder/taesd, as safetensors. Takes a few minutes and ~8 GB of disk."""
    if (folder / "sdxl" / "model_index.json").exists() and (folder / "taesd" / "config.json").exists():
        return folder / "sdxl"
    parts = {name: _materialize(module, dtype) for name, module in full_components("meta").items()}
    tokenizer = write_clip_tokenizer(folder / "_tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=parts["unet"],
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
    )
    pipe.save_pretrained(folder / "sdxl")
    parts["taesd"].save_pretrained(folder / "taesd")
    return folder / "sdxl"


if __name__ == "__main__":
    # `python -m tests.sdxl_builder FOLDER`: a tiny random SDXL to try the app without downloads.
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-sdxl")
    build_tiny_sdxl(target)
    print(f"MODEL_ID={target / 'sdxl'} TINY_VAE_ID={target / 'taesd'}")


# ---- a style for the tiny SDXL: a LoRA made with peft ------------------------------------------------

def build_tiny_lora(sdxl_folder: Path, out: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA adapter for the tiny UNet's attention projections, saved as diffusers writes them
    (pytorch_lora_weights.safetensors). Random, not zero, up-projections (peft's default init makes the
    adapter a no-op until trained), so it visibly changes the image."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sdxl_folder / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank * 4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                                safe_serialization=True)
    return out
