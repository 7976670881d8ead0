"""A tiny, randomly initialised Stable Diffusion in the real diffusers folder layout, and a tiny
CLIP in the transformers layout for the scoring metrics.

Tests and `vedit demo` need a model that builds in about a second, with no network: the same
component classes and file names as a real SD 1.x/2.x checkpoint (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, safetensors weights), only very small. A 64 px frame
becomes an 8 x 8 latent. The CLIP tokenizer gets a byte-level BPE vocabulary written here, so
any English prompt tokenizes without fetching OpenAI's vocabulary.

With `sdxl`, the folder is laid out as `StableDiffusionXLPipeline` saves SDXL: a second text
encoder with a projection (`text_encoder_2/`, `tokenizer_2/`), a UNet with SDXL's added
"text_time" conditioning and deeper, linear-projection transformers, an Euler scheduler and
`force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vedit.errors import BadInputError
from vedit.progress import quiet_library_progress
from vedit.project import atomic_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

#: Side of a frame, in pixels, that the tiny model was "trained" at (latent 8 x 8).
TINY_RESOLUTION = 64

#: Side of the tiny CLIP's input images (OpenAI's CLIP ViT-L/14 reads 224).
TINY_CLIP_RESOLUTION = 32

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A few merges of frequent English pairs: enough that prompts don't spend a token per letter
# everywhere, few enough that the vocabulary stays at ~530 entries.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>"),
    ("e", "r"), ("o", "n"), ("a", "r"), ("e", "n"), ("o", "r"), ("a", "t"), ("i", "s</w>"),
    ("e", "s</w>"), ("o", "u"), ("l", "e</w>"), ("a", "l"), ("r", "e"), ("s", "t"), ("e", "d</w>"),
)


def build_tiny_model(path: Path, *, prediction_type: str = "epsilon", seed: int = 0,
                     sd2: bool = False, sdxl: bool = False) -> Path:
    """Write a tiny seeded SD model (SD 2.x-style when `sd2`, SDXL's layout when `sdxl`) to
    `path`, atomically; return it.

    `path` must not exist or be an empty folder. Same seed, same weights.
    """
    import torch
    from diffusers import UNet2DConditionModel

    if sd2 and sdxl:
        raise ValueError("a tiny model is SD 2.x-style or SDXL, not both")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(sdxl_unet_config() if sdxl else unet_config(sd2)))
        vae = _calibrated(_vae())
        text_encoder = _text_encoder(sd2)
        text_encoder_2 = _text_encoder(True, projection=True) if sdxl else None
    scheduler = _sdxl_scheduler(prediction_type) if sdxl else _scheduler(prediction_type, sd2)
    return write_model(path, unet, vae, text_encoder, scheduler, sd2=sd2,
                       text_encoder_2=text_encoder_2)


def write_model(path: Path, unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextModel, scheduler: SchedulerMixin, *, sd2: bool = False,
                text_encoder_2: CLIPTextModelWithProjection | None = None) -> Path:
    """Write SD components built in code to `path` in the diffusers layout, atomically, with
    this module's tokenizer (the text encoders' vocabulary must cover `tiny_clip_vocab()`);
    with `text_encoder_2`, in SDXL's layout. The benchmarks write SD 1.5's shapes this way.
    `path` must not exist or be an empty folder."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"{path} already exists and is not empty.",
                            "Choose a new folder for the model.")
    modules: list[tuple[str, Any]] = [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]
    with atomic_dir(path) as staging:
        _write_tokenizer(staging / "tokenizer", sd2=sd2)
        if text_encoder_2 is not None:  # OpenCLIP's tokenizer, as SD 2.x's
            _write_tokenizer(staging / "tokenizer_2", sd2=True)
            modules.append(("text_encoder_2", text_encoder_2))
        with quiet_library_progress():
            for name, module in modules:
                module.save_pretrained(staging / name, safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        index = _model_index(type(scheduler).__name__)
        _write_json(staging / "model_index.json",
                    index if text_encoder_2 is None else _sdxl_model_index(index))
    return path


def unet_config(sd2: bool = False) -> dict[str, Any]:
    """SD's UNet shape at toy scale: attention in the first level, none in the last (the tests
    build their UNets from it too, so they test the shape the tiny model has)."""
    return {
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        # SD 1.x passes one number (really the head count); SD 2.x a list and linear projections.
        "attention_head_dim": (2, 4) if sd2 else 8,
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
        "norm_num_groups": 8,
    }


def write_config_folder(path: Path, *, unet: dict[str, Any], vae: dict[str, Any],
                        text_encoder: dict[str, Any], scheduler: dict[str, Any],
                        text_encoder_2: dict[str, Any] | None = None) -> Path:
    """Write a diffusers SD folder that holds only configs and a tokenizer, no weights, as
    `vedit fetch-models --configs-only` leaves one: what the memory prediction needs of a
    model of any shape (SD 1.5's and SDXL's, in the benchmarks); with `text_encoder_2`, in
    SDXL's layout. The tokenizers are the tiny ones; the text encoders' special token ids are
    set to match them."""
    from transformers import CLIPTextConfig

    path = Path(path)
    with atomic_dir(path) as staging:
        encoders = [("text_encoder", text_encoder, False)]
        if text_encoder_2 is not None:
            encoders.append(("text_encoder_2", text_encoder_2, True))
        for name, config, sd2 in encoders:
            vocab = _write_tokenizer(staging / name.replace("text_encoder", "tokenizer"), sd2=sd2)
            (staging / name).mkdir()
            CLIPTextConfig(**config | {"bos_token_id": vocab[BOS_TOKEN],
                                       "eos_token_id": vocab[EOS_TOKEN],
                                       "pad_token_id": vocab[_pad_token(sd2)]}).to_json_file(
                staging / name / "config.json")
        for name, config, cls in (("unet", unet, "UNet2DConditionModel"),
                                  ("vae", vae, "AutoencoderKL")):
            (staging / name).mkdir()
            _write_json(staging / name / "config.json", {"_class_name": cls, **config})
        (staging / "scheduler").mkdir()
        _write_json(staging / "scheduler" / "scheduler_config.json",
                    {"_class_name": "DDIMScheduler", **scheduler})
        index = _model_index("DDIMScheduler")
        _write_json(staging / "model_index.json",
                    index if text_encoder_2 is None else _sdxl_model_index(index))
    return path


def build_tiny_clip(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny seeded CLIP (image and text towers, processor, tokenizer) to `path` in the
    layout of a transformers hub repo such as openai/clip-vit-large-patch14; return it."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"{path} already exists and is not empty.",
                            "Choose a new folder for the tiny CLIP.")
    with atomic_dir(path) as staging:
        vocab = _write_tokenizer(staging, sd2=False)
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                    bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                    pad_token_id=vocab[EOS_TOKEN])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=TINY_CLIP_RESOLUTION, patch_size=8)
        with torch.random.fork_rng(devices=[]), quiet_library_progress():
            torch.manual_seed(seed)
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=16))
            model.save_pretrained(staging, safe_serialization=True)
        # As OpenAI's repo has it (the older, flat form of the image processor's config).
        _write_json(staging / "preprocessor_config.json", {
            "crop_size": TINY_CLIP_RESOLUTION, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3, "size": TINY_CLIP_RESOLUTION})
    return path


#: The widths of the tiny text encoders: SD's (and SDXL's first), and SDXL's second. They differ
#: as SDXL's 768 and 1280 do, which is how diffusers' single-file conversion tells them apart;
#: SDXL's UNet cross-attends to both encoders' states concatenated.
_TEXT_WIDTH = 32
_TEXT_WIDTH_2 = 48


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL's UNet shape at toy scale: no attention in the first level, deeper transformers
    below (SDXL's are 2 and 10 deep), linear projections, and the "text_time" added embedding
    of the pooled prompt and six size numbers (original size, crop corner, target size)."""
    time_embed_dim = 8
    return {
        **unet_config(sd2=True),  # SD 2.x's heads and linear projections, at the same scale
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": _TEXT_WIDTH + _TEXT_WIDTH_2,
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * time_embed_dim + _TEXT_WIDTH_2,
    }


def vae_config() -> dict[str, Any]:
    """Four levels, so a scale factor of 8 like SD's VAE, with a handful of channels; the
    scaling factor is SD's until `_calibrated` sets the tiny VAE's own."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION,
        "scaling_factor": 0.18215,
    }


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config())


def _calibrated(vae: Any) -> Any:
    """Set the VAE's scaling factor so that latents of a typical frame have unit variance, as
    Stable Diffusion's 0.18215 was chosen; the diffusion schedule assumes latents of that scale."""
    import torch

    from vedit.synthetic import pattern

    frame = torch.from_numpy(pattern(TINY_RESOLUTION, TINY_RESOLUTION, 1, 4)).float()
    frame = frame.permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        std = vae.encode(frame).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1 / std, 4))
    return vae


def text_encoder_config(sd2: bool = False, *, projection: bool = False) -> dict[str, Any]:
    """A small CLIP text encoder over `tiny_clip_vocab()`, as `CLIPTextConfig` keywords; with
    `projection`, SDXL's second encoder, wider and one layer deeper."""
    vocab = tiny_clip_vocab()
    width = _TEXT_WIDTH_2 if projection else _TEXT_WIDTH
    return {
        "vocab_size": len(vocab),
        "hidden_size": width,
        "intermediate_size": 64,
        "num_hidden_layers": 3 if projection else 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": width,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[_pad_token(sd2)],
    }


def _text_encoder(sd2: bool, *, projection: bool = False) -> Any:
    """CLIP's text transformer; with `projection`, SDXL's second encoder, whose pooled output
    goes through a projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**text_encoder_config(sd2, projection=projection))
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _scheduler(prediction_type: str, sd2: bool) -> Any:
    """The scheduler configs SD 1.4 (PNDM) and SD 2.1 (DDIM) ship with."""
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type)
    if sd2:
        return DDIMScheduler(clip_sample=False, **common)
    return PNDMScheduler(skip_prk_steps=True, **common)


def _sdxl_scheduler(prediction_type: str) -> Any:
    """The Euler scheduler config SDXL base 1.0 ships with."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading", interpolation_type="linear",
                                  use_karras_sigmas=False, prediction_type=prediction_type)


def _sdxl_model_index(sd_index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json as `StableDiffusionXLPipeline.save_pretrained` writes it."""
    index = {key: value for key, value in sd_index.items()
             if key not in ("safety_checker", "requires_safety_checker")}
    return index | {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }


def _model_index(scheduler_class: str) -> dict[str, Any]:
    """model_index.json as `StableDiffusionPipeline.save_pretrained` writes it, no safety
    checker."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _pad_token(sd2: bool) -> str:
    """SD 1.x pads with end-of-text; SD 2.x's OpenCLIP tokenizer pads with "!" (id 0)."""
    return "!" if sd2 else EOS_TOKEN


def _write_tokenizer(folder: Path, *, sd2: bool) -> dict[str, int]:
    """Write vocab.json, merges.txt and the two token configs of a CLIP BPE tokenizer."""
    vocab = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    merges = "\n".join(f"{left} {right}" for left, right in _MERGES)
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": _pad_token(sd2)}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    })
    return vocab


def tiny_clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout in small: every byte, every byte ending a word, the merges,
    then the two special tokens last (CLIP's pooled output looks for the highest id)."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [f"{char}</w>" for char in byte_chars]
    tokens += [left + right for left, right in _MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
