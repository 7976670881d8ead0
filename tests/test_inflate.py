"""The inflated (pseudo-3D) UNet: its math, its causality, and parity with Tune-A-Video."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from vedit.inflate import (
    FrameContext,
    FrameJointGroupNorm,
    InflatedUNet,
    SparseCausalAttnProcessor,
    inflate_unet,
)
from vedit.tiny_model import unet_config

PARITY_FILE = Path(__file__).parent / "data" / "tav_parity.safetensors"

SD1 = unet_config()
SD2 = dict(  # the tiny SD 2.x shape, with attention at both levels and its own context width
    unet_config(sd2=True),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
)
CONFIGS = {"sd1": SD1, "sd2": SD2}


def tiny_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def randomise_temporal(model: InflatedUNet, seed: int = 1) -> None:
    """Give the temporal attention non-zero weights, as tuning would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.temporal_parameters().values():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def clip_inputs(
    config: dict, num_frames: int = 3, batch: int = 2, seed: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample (b, c, f, h, w), timestep (b,), encoder_hidden_states (b, n, d))."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, num_frames, 8, 8, generator=generator)
    timestep = torch.tensor([10, 500][:batch])
    prompts = torch.randn(batch, 5, config["cross_attention_dim"], generator=generator)
    return sample, timestep, prompts


def naive_sparse_causal(attn: Attention, tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, keys/values from frames 0 and i-1, written out."""
    query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    head_dim = query.shape[-1] // attn.heads
    out = torch.empty_like(query)
    for row in range(tokens.shape[0]):
        first = row - row % num_frames
        previous = max(row - 1, first)
        keys = torch.cat([key[first], key[previous]])
        values = torch.cat([value[first], value[previous]])
        for head in range(attn.heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = query[row][:, cols] @ keys[:, cols].T / math.sqrt(head_dim)
            out[row][:, cols] = torch.softmax(scores, dim=-1) @ values[:, cols]
    return attn.to_out[0](out)


@pytest.mark.parametrize("num_frames", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_causal_attention_matches_naive_reference(num_frames: int, bias: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=bias).double()
    attn.set_processor(SparseCausalAttnProcessor(FrameContext(num_frames)))
    tokens = torch.randn(2 * num_frames, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(tokens), naive_sparse_causal(attn, tokens, num_frames))


@pytest.mark.parametrize("name", CONFIGS)
def test_untuned_one_frame_clip_equals_2d_unet(name: str) -> None:
    unet = tiny_unet(CONFIGS[name])
    sample, timestep, prompts = clip_inputs(CONFIGS[name], num_frames=1)
    with torch.no_grad():
        expected = unet(sample[:, :, 0], timestep, prompts).sample
        inflated = inflate_unet(unet)
        actual = inflated(sample, timestep, prompts)[:, :, 0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_per_frame_norms_first_frame_equals_2d_unet() -> None:
    """Frame 0 attends only to itself, so with per-frame norms it is the 2D UNet's image."""
    unet = tiny_unet(SD1)
    sample, timestep, prompts = clip_inputs(SD1, num_frames=3)
    with torch.no_grad():
        expected = unet(sample[:, :, 0], timestep, prompts).sample
        actual = inflate_unet(unet, frame_joint_norm=False)(sample, timestep, prompts)[:, :, 0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_frame_joint_group_norm_equals_5d_group_norm() -> None:
    torch.manual_seed(0)
    plain = nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    clip = torch.randn(2, 16, 3, 5, 7)  # (b, c, f, h, w)
    joint = FrameJointGroupNorm(plain, FrameContext(num_frames=3))
    frames = clip.permute(0, 2, 1, 3, 4).reshape(6, 16, 5, 7)  # (b f) c h w
    expected = F.group_norm(clip, 4, plain.weight, plain.bias, 1e-6)
    actual = joint(frames).reshape(2, 3, 16, 5, 7).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(actual, expected)
    assert joint.weight is plain.weight and joint.bias is plain.bias


def test_norm_swap_keeps_parameters_and_names() -> None:
    unet = tiny_unet(SD1)
    names_2d = set(unet.state_dict())
    norm1 = unet.down_blocks[0].resnets[0].norm1
    inflated = inflate_unet(unet)
    swapped = unet.down_blocks[0].resnets[0].norm1
    assert isinstance(swapped, FrameJointGroupNorm) and swapped.weight is norm1.weight
    assert isinstance(unet.conv_norm_out, FrameJointGroupNorm)
    # The transformers' own norm is per frame in the original too.
    assert type(unet.down_blocks[0].attentions[0].norm) is nn.GroupNorm
    assert set(unet.state_dict()) == names_2d | set(inflated.temporal_parameters())


def test_per_frame_option_keeps_plain_group_norms() -> None:
    unet = tiny_unet(SD1)
    inflate_unet(unet, frame_joint_norm=False)
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(norm) is nn.GroupNorm for norm in norms)


def frame_changes(model: InflatedUNet, perturbed_frame: int) -> list[float]:
    """Largest change of each output frame when one input frame is perturbed."""
    sample, timestep, prompts = clip_inputs(SD1, num_frames=4)
    perturbed = sample.clone()
    noise = torch.randn(sample[:, :, 0].shape, generator=torch.Generator().manual_seed(4))
    perturbed[:, :, perturbed_frame] += noise
    with torch.no_grad():
        change = (model(perturbed, timestep, prompts) - model(sample, timestep, prompts)).abs()
    return change.amax(dim=(0, 1, 3, 4)).tolist()


def test_sparse_causal_attention_is_causal_with_per_frame_norms() -> None:
    """Per-frame norms only: joint GroupNorm statistics make every frame depend on every other."""
    model = inflate_unet(tiny_unet(SD1), frame_joint_norm=False)
    changes = frame_changes(model, perturbed_frame=2)
    assert max(changes[:2]) < 1e-6 and min(changes[2:]) > 1e-3
    randomise_temporal(model)  # temporal attention sees all frames, earlier ones included
    assert min(frame_changes(model, perturbed_frame=2)) > 1e-3


def test_frame_joint_norms_couple_all_frames() -> None:
    model = inflate_unet(tiny_unet(SD1))
    assert min(frame_changes(model, perturbed_frame=2)) > 1e-4


def test_temporal_attention_starts_at_zero_and_is_named_like_the_original() -> None:
    model = inflate_unet(tiny_unet(SD1))
    params = model.temporal_parameters()
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0."
    assert {name for name in params if name.startswith(prefix)} == {
        prefix + suffix
        for suffix in (
            "attn_temp.to_q.weight",
            "attn_temp.to_k.weight",
            "attn_temp.to_v.weight",
            "attn_temp.to_out.0.weight",
            "attn_temp.to_out.0.bias",
            "norm_temp.weight",
            "norm_temp.bias",
        )
    }
    outputs = [p for name, p in params.items() if ".attn_temp.to_out.0." in name]
    assert len(outputs) == 2 * 4  # one block down, one mid, two up (layers_per_block + 1)
    assert all(torch.count_nonzero(p) == 0 for p in outputs)
    block = model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1.processor, SparseCausalAttnProcessor)
    assert isinstance(block.attn2.processor, AttnProcessor2_0)
    assert block.attn_temp.heads == block.attn1.heads


def test_timestep_forms_agree() -> None:
    model = inflate_unet(tiny_unet(SD1))
    sample, _, prompts = clip_inputs(SD1)
    with torch.no_grad():
        outputs = [model(sample, t, prompts) for t in (250, torch.tensor(250), torch.tensor([250]))]
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])


def test_inflating_twice_is_refused() -> None:
    unet = tiny_unet(SD1)
    inflate_unet(unet)
    with pytest.raises(ValueError, match="already inflated"):
        inflate_unet(unet)


def test_peft_lora_on_query_projections_applies_in_sparse_causal_attention() -> None:
    model = inflate_unet(tiny_unet(SD1))
    names = set(model.temporal_parameters())
    config = LoraConfig(r=4, target_modules=["attn1.to_q", "attn2.to_q"])
    inject_adapter_in_model(config, model.unet)
    sample, timestep, prompts = clip_inputs(SD1)
    with torch.no_grad():
        untuned = model(sample, timestep, prompts)
        for name, param in model.unet.named_parameters():
            if "attn1.to_q.lora_B" in name:  # only the sparse-causal processor's query
                param.normal_()
        tuned = model(sample, timestep, prompts)
    assert (tuned - untuned).abs().max() > 1e-3
    assert set(model.temporal_parameters()) == names


def gradients(model: InflatedUNet, interleave: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of a fixed loss; `interleave` runs a 2-frame forward before backward."""
    model.zero_grad()
    sample, timestep, prompts = clip_inputs(SD1, num_frames=3)
    weights = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    loss = (model(sample, timestep, prompts) * weights).sum()
    if interleave:
        with torch.no_grad():
            model(sample[:, :, :2], timestep, prompts)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_equal_gradients() -> None:
    model = inflate_unet(tiny_unet(SD1)).train()
    randomise_temporal(model)
    expected = gradients(model)
    replays = []
    norm = model.unet.down_blocks[0].resnets[0].norm1
    norm.register_forward_hook(lambda *_: replays.append(norm.context.num_frames))

    model.enable_gradient_checkpointing()
    for actual in (gradients(model), gradients(model, interleave=True)):
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], msg=name)
    # Each checkpointed forward was replayed during backward, with 3 frames.
    assert replays == [3, 3, 3, 2, 3]

    # diffusers' own checkpoint function relies on the frame count staying set.
    model.unet.enable_gradient_checkpointing()
    actual = gradients(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)
    model.disable_gradient_checkpointing()
    assert not model.unet.is_gradient_checkpointing


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_run(name: str, dtype: torch.dtype) -> None:
    model = inflate_unet(tiny_unet(CONFIGS[name]).to(dtype)).train()
    model.enable_gradient_checkpointing()
    sample, timestep, prompts = clip_inputs(CONFIGS[name])
    prediction = model(sample.to(dtype), timestep, prompts.to(dtype))
    assert prediction.shape == sample.shape and prediction.dtype == dtype
    prediction.float().square().mean().backward()
    grads = [p.grad for p in model.temporal_parameters().values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.dtype == dtype and model.config.in_channels == 4


def load_parity_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and tensors recorded from the original UNet3D by scripts/tav_parity.py."""
    with safe_open(PARITY_FILE, "pt") as file:
        config = json.loads(file.metadata()[f"{name}/config"])
        tensors = {
            key[len(name) + 1 :]: file.get_tensor(key)
            for key in file.keys()  # noqa: SIM118 - safetensors' handle is not iterable
            if key.startswith(f"{name}/")
        }
    return config, tensors


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_original_tune_a_video_unet3d(name: str) -> None:
    config, tensors = load_parity_case(name)
    # The original's block classes are the 2D ones with "3D" in the name; weights keep their
    # names one to one (the file leaves out Downsample3D's alias `Conv2d_0` of `conv`).
    for key in ("down_block_types", "up_block_types"):
        config[key] = [block.replace("3D", "2D") for block in config[key]]
    model = inflate_unet(UNet2DConditionModel(**config)).eval()
    prefix = "weights/"
    weights = {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
    model.unet.load_state_dict(weights, strict=True)
    with torch.no_grad():
        output = model(tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"])
    torch.testing.assert_close(output, tensors["output"], atol=2e-5, rtol=1e-5)
