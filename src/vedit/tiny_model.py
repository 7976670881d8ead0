"""A tiny, randomly initialised Stable Diffusion in the real diffusers folder layout.

Tests and `vedit demo` need a model that builds in about a second, with no network: the same
component classes and file names as a real SD 1.x/2.x checkpoint (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, safetensors weights), only very small. A 64 px frame
becomes an 8 x 8 latent. The CLIP tokenizer gets a byte-level BPE vocabulary written here, so
any English prompt tokenizes without fetching OpenAI's vocabulary.
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
    from transformers import CLIPTextModel

#: Side of a frame, in pixels, that the tiny model was "trained" at (latent 8 x 8).
TINY_RESOLUTION = 64

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
                     sd2: bool = False) -> Path:
    """Write a tiny seeded SD model (SD 2.x-style when `sd2`) to `path`, atomically; return it.

    `path` must not exist or be an empty folder. Same seed, same weights.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _unet(sd2), _calibrated(_vae())
        text_encoder = _text_encoder(sd2)
    return write_model(path, unet, vae, text_encoder, _scheduler(prediction_type, sd2), sd2=sd2)


def write_model(path: Path, unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextModel, scheduler: SchedulerMixin, *,
                sd2: bool = False) -> Path:
    """Write SD components built in code to `path` in the diffusers layout, atomically, with
    this module's tokenizer (the text encoder's vocabulary must cover `tiny_clip_vocab()`);
    the benchmarks write SD 1.5's shapes this way. `path` must not exist or be empty."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"{path} already exists and is not empty.",
                            "Choose a new folder for the model.")
    with atomic_dir(path) as staging:
        _write_tokenizer(staging / "tokenizer", sd2=sd2)
        with quiet_library_progress():
            for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
                module.save_pretrained(staging / name, safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
        _write_json(staging / "model_index.json", _model_index(type(scheduler).__name__))
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


def _unet(sd2: bool) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(sd2))


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


def text_encoder_config(sd2: bool = False) -> dict[str, Any]:
    """A two-layer CLIP text encoder over `tiny_clip_vocab()`, as `CLIPTextConfig` keywords."""
    vocab = tiny_clip_vocab()
    return {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[_pad_token(sd2)],
    }


def _text_encoder(sd2: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config(sd2)))


def _scheduler(prediction_type: str, sd2: bool) -> Any:
    """The scheduler configs SD 1.4 (PNDM) and SD 2.1 (DDIM) ship with."""
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type)
    if sd2:
        return DDIMScheduler(clip_sample=False, **common)
    return PNDMScheduler(skip_prk_steps=True, **common)


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


def _write_tokenizer(folder: Path, *, sd2: bool) -> None:
    """Write vocab.json, merges.txt and the two token configs of a CLIP BPE tokenizer."""
    vocab = tiny_clip_vocab()
    folder.mkdir(parents=True)
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
