"""Stable Diffusion 1.5's shapes with random weights, built in code, for the benchmarks.

Speed and memory do not depend on weight values, so the benchmarks build the real SD 1.5 UNet
(320/640/1280/1280, cross-attention 768), VAE (128/256/512/512) and CLIP text encoder
(768 wide, 12 layers) from their configs, seeded, straight on the device: no download. The
rows that run vedit's stages load them from disk (`write_model`), as a user's model. `TINY`
has the shapes of `vedit.tiny_model`, so every benchmark also runs on a CPU in seconds.

    python benchmarks/shapes.py            # SD 1.5: parameter counts and build time
    python benchmarks/shapes.py --tiny --device cpu
    python benchmarks/shapes.py --sdxl-configs /tmp/sdxl   # SDXL 1.0's configs, no weights
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from vedit.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    TINY_RESOLUTION,
    build_tiny_model,
    text_encoder_config,
    tiny_clip_vocab,
    unet_config,
    vae_config,
    write_config_folder,
)
from vedit.tiny_model import write_model as save_model

SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
    hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

#: SD 1.x's noise schedule, as its scheduler config; DDIM as vedit samples with it.
SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon",
)


#: SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0), for the memory
#: prediction of an SDXL run: UNet 2.6 B parameters, transformers 1, 2 and 10 deep.
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE: dict[str, Any] = SD15_VAE | dict(sample_size=1024, scaling_factor=0.13025,
                                           force_upcast=True)
SDXL_TEXT_2: dict[str, Any] = SD15_TEXT | dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu", pad_token_id=0,
)


@dataclass(frozen=True)
class Shapes:
    """The configs of one model family and the pixel size it was trained at."""

    name: str
    unet: dict[str, Any] = field(repr=False, compare=False)
    vae: dict[str, Any] = field(repr=False, compare=False)
    text: dict[str, Any] = field(repr=False, compare=False)
    resolution: int

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along a side (8 for SD's four-level VAE)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def text_tokens(self) -> int:
        """The text encoder's sequence length (77 for CLIP)."""
        return self.text["max_position_embeddings"]


SD15 = Shapes("sd15", SD15_UNET, SD15_VAE, SD15_TEXT, resolution=512)
#: vedit.tiny_model's own shapes (its config functions), so the CPU form runs in seconds.
TINY = Shapes("tiny", unet_config(), vae_config(), text_encoder_config(),
              resolution=TINY_RESOLUTION)


def shapes_for(tiny: bool) -> Shapes:
    """The tiny shapes for the CPU form, else SD 1.5's."""
    return TINY if tiny else SD15


def _build(factory: Any, device: torch.device | str, dtype: torch.dtype, seed: int) -> Any:
    """Construct a module straight on `device` (fast random init on a GPU), seeded, then cast:
    the same seed gives the same weights in every dtype, rounded. Frozen, in eval mode."""
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []), \
            torch.device(device):
        torch.manual_seed(seed)
        module = factory()
    # nn.Module.to: diffusers' own `to` warns about casting models loaded without torch_dtype.
    return nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)


def build_unet(shapes: Shapes, device: torch.device | str, dtype: torch.dtype,
               seed: int = 0) -> UNet2DConditionModel:
    """The 2D UNet with random weights (inflate it with `vedit.inflate.inflate_unet`)."""
    return _build(lambda: UNet2DConditionModel(**shapes.unet), device, dtype, seed)


def build_vae(shapes: Shapes, device: torch.device | str, dtype: torch.dtype,
              seed: int = 1, force_upcast: bool = True) -> AutoencoderKL:
    """The VAE with random weights; `force_upcast=False` keeps an fp16 VAE in fp16 to decode,
    as the diffusers of the original Tune-A-Video did."""
    return _build(lambda: AutoencoderKL(**shapes.vae, force_upcast=force_upcast), device, dtype,
                  seed)


def build_text_encoder(shapes: Shapes, device: torch.device | str, dtype: torch.dtype,
                       seed: int = 2) -> CLIPTextModel:
    """The CLIP text encoder with random weights."""
    return _build(lambda: CLIPTextModel(CLIPTextConfig(**shapes.text)), device, dtype, seed)


def write_model(shapes: Shapes, folder: Path, device: torch.device | str) -> Path:
    """A random model of these shapes on disk in the diffusers layout, for vedit's stages to
    load as a user's model: `vedit.tiny_model`'s own for the tiny shapes; SD 1.5's in fp16, the
    size of its fp16 files, with the tiny tokenizer (token ids don't change the cost)."""
    if shapes.name == TINY.name:
        return build_tiny_model(folder)
    vocab = tiny_clip_vocab()
    ids = {"bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN],
           "pad_token_id": vocab[EOS_TOKEN]}
    text_encoder = _build(lambda: CLIPTextModel(CLIPTextConfig(**shapes.text | ids)), device,
                          torch.float16, seed=2)
    return save_model(folder, build_unet(shapes, device, torch.float16),
                      build_vae(shapes, device, torch.float16), text_encoder, build_scheduler())


def build_scheduler() -> DDIMScheduler:
    """DDIM on SD 1.x's noise schedule, as vedit samples and inverts with."""
    return DDIMScheduler(**SCHEDULER)


def prompt_ids(shapes: Shapes, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """Token ids `(1, 77)` of a prompt: random, since their values cost nothing extra."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shapes.text["vocab_size"] - 2, (1, shapes.text_tokens),
                        generator=generator)
    return ids.to(device)


def write_configs(shapes: Shapes, folder: Path) -> Path:
    """A model folder with these shapes' configs and a tokenizer but no weights (as `vedit
    fetch-models --configs-only` leaves one), for the memory prediction."""
    return write_config_folder(folder, unet=shapes.unet, vae=shapes.vae,
                               text_encoder=shapes.text, scheduler=SCHEDULER)


def write_sdxl_configs(folder: Path) -> Path:
    """SDXL base 1.0's configs-only folder, for `vedit tune --dry-run --model FOLDER`."""
    return write_config_folder(folder, unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=SD15_TEXT,
                               text_encoder_2=SDXL_TEXT_2,
                               scheduler=SCHEDULER | dict(timestep_spacing="leading"))


def parameter_count(module: torch.nn.Module) -> int:
    """All parameters, to check that the shapes are SD 1.5's (UNet 859.5 M)."""
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    """Build the three models and print their parameter counts and build times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="vedit.tiny_model's shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sdxl-configs", type=Path, metavar="FOLDER",
                        help="only write SDXL base 1.0's configs-only folder to FOLDER")
    args = parser.parse_args(argv)
    if args.sdxl_configs:
        print(write_sdxl_configs(args.sdxl_configs))
        return
    shapes, dtype = shapes_for(args.tiny), getattr(torch, args.dtype)
    for name, build in (("unet", build_unet), ("vae", build_vae),
                        ("text_encoder", build_text_encoder)):
        started = time.perf_counter()
        module = build(shapes, args.device, dtype)
        seconds = time.perf_counter() - started
        print(f"{shapes.name} {name}: {parameter_count(module) / 1e6:.1f} M parameters, "
              f"built on {args.device} in {seconds:.2f} s")


if __name__ == "__main__":
    main()
