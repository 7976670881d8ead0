"""The pseudo-3D UNet of Tune-A-Video (arXiv 2212.11565), built on a diffusers 2D UNet in place.

A clip of `f` frames runs through the 2D UNet as a batch of `b * f` images, so convolutions
and cross-attention work per frame. Three changes make it a video model, all through extension
points (attention processors, child modules with forward hooks, module swaps), never a fork:

- self-attention (`attn1`) is sparse-causal: frame i attends to frames 0 and i - 1;
- every transformer block gets a temporal attention over frames (`attn_temp`, `norm_temp`),
  run after the block's feed-forward, its output projection zero-initialised;
- the ResNet GroupNorms and `conv_norm_out` take statistics over all frames jointly.

The frame count reaches those modules through one shared `FrameContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from einops import rearrange
from torch import nn

TEMPORAL_MODULES = ("attn_temp", "norm_temp")


@dataclass
class FrameContext:
    """How many frames each clip in the running batch has; shared by all inflated modules.

    Set by `InflatedUNet.forward` and left set afterwards: diffusers' non-reentrant gradient
    checkpointing recomputes blocks during backward, after forward has returned.
    """

    num_frames: int = 1

    @contextmanager
    def frames(self, num_frames: int) -> Iterator[None]:
        """Temporarily run with `num_frames` (used to replay a checkpointed block)."""
        previous, self.num_frames = self.num_frames, num_frames
        try:
            yield
        finally:
            self.num_frames = previous


class SparseCausalAttnProcessor:
    """Self-attention in which frame i's queries attend to the keys/values of frames 0 and i - 1.

    Modelled on diffusers' `AttnProcessor2_0`; goes through `attn.to_q/to_k/to_v/to_out` so that
    LoRA adapters on them apply. Frame 0 sees its own tokens twice, as in the original.
    """

    def __init__(self, context: FrameContext) -> None:
        self.context = context

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sparse-causal attention is self-attention without a mask")
        num_frames = self.context.num_frames
        query = attn.to_q(hidden_states)
        key = first_and_previous_frames(attn.to_k(hidden_states), num_frames)
        value = first_and_previous_frames(attn.to_v(hidden_states), num_frames)
        query, key, value = (
            rearrange(t, "n s (h d) -> n h s d", h=attn.heads) for t in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        hidden_states = rearrange(hidden_states, "n h s d -> n s (h d)")
        projected: torch.Tensor = attn.to_out[1](attn.to_out[0](hidden_states))
        return projected


def first_and_previous_frames(tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`(b f) n c -> (b f) 2n c`: frame i's tokens become frame 0's followed by frame i-1's."""
    tokens = rearrange(tokens, "(b f) n c -> b f n c", f=num_frames)
    previous = (torch.arange(num_frames, device=tokens.device) - 1).clamp(min=0)
    first = tokens[:, :1].expand_as(tokens)
    return rearrange(torch.cat([first, tokens[:, previous]], dim=2), "b f n c -> (b f) n c")


class FrameJointGroupNorm(nn.GroupNorm):
    """GroupNorm over all frames of a clip at once, as the original's norms on 5-D tensors do.

    Holds the Parameters of the norm it replaces, so parameter names and loaded weights carry over.
    """

    def __init__(self, norm: nn.GroupNorm, context: FrameContext) -> None:
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        self.weight, self.bias = norm.weight, norm.bias
        self.context = context

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        clip = rearrange(hidden_states, "(b f) c h w -> b c f h w", f=self.context.num_frames)
        clip = F.group_norm(clip, self.num_groups, self.weight, self.bias, self.eps)
        return rearrange(clip, "b c f h w -> (b f) c h w")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frame_joint=True"


def add_temporal_attention(block: BasicTransformerBlock, context: FrameContext) -> None:
    """Give `block` an `attn_temp` with its `norm_temp`, run after the block's own forward."""
    attn1 = block.attn1
    weight = attn1.to_q.weight
    block.attn_temp = Attention(
        query_dim=attn1.query_dim,
        heads=attn1.heads,
        dim_head=attn1.inner_dim // attn1.heads,
        dropout=attn1.to_out[1].p,
        bias=attn1.use_bias,
        upcast_attention=attn1.upcast_attention,
    ).to(device=weight.device, dtype=weight.dtype)
    # Zero output (weight and bias): the untuned video model is exactly the image model.
    nn.init.zeros_(block.attn_temp.to_out[0].weight)
    nn.init.zeros_(block.attn_temp.to_out[0].bias)
    block.norm_temp = nn.LayerNorm(attn1.query_dim, device=weight.device, dtype=weight.dtype)
    # A hook, not a wrapper, keeps every name (`...transformer_blocks.N.attn1`) as it was, and
    # runs inside the block's call, so diffusers' per-block checkpointing covers it too.
    block.register_forward_hook(partial(temporal_attention_hook, context))


def temporal_attention_hook(
    context: FrameContext, block: BasicTransformerBlock, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor:
    """Attend over frames at each spatial position: `h = attn_temp(norm_temp(h)) + h`."""
    num_tokens = output.shape[1]
    hidden_states = rearrange(output, "(b f) n c -> (b n) f c", f=context.num_frames)
    attended: torch.Tensor = block.attn_temp(block.norm_temp(hidden_states))
    return rearrange(attended + hidden_states, "(b n) f c -> (b f) n c", n=num_tokens)


def frame_joint_norms(unet: UNet2DConditionModel) -> Iterator[tuple[nn.Module, str]]:
    """(parent, name) of the GroupNorms that see 5-D tensors in the original.

    These are the ResNet blocks' `norm1`/`norm2` and `conv_norm_out`; the transformers' own
    `norm` works per frame in the original (it rearranges to `(b f)` first), so it stays.
    """
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            yield module, "norm1"
            yield module, "norm2"
    if unet.conv_norm_out is not None:
        yield unet, "conv_norm_out"


def swap_in_frame_joint_norms(unet: UNet2DConditionModel, context: FrameContext) -> None:
    """Replace the GroupNorms that the original runs over whole clips by `FrameJointGroupNorm`."""
    for parent, name in frame_joint_norms(unet):
        norm = getattr(parent, name)
        if type(norm) is not nn.GroupNorm:
            raise ValueError(f"expected a GroupNorm at {name}, found {type(norm).__name__}")
        setattr(parent, name, FrameJointGroupNorm(norm, context))


class InflatedUNet(nn.Module):
    """A diffusers UNet2DConditionModel inflated in place to run on clips `(b, c, f, h, w)`."""

    def __init__(self, unet: UNet2DConditionModel, context: FrameContext) -> None:
        super().__init__()
        self.unet = unet
        self.context = context

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.unet.dtype
        return dtype

    @property
    def device(self) -> torch.device:
        device: torch.device = self.unet.device
        return device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict noise for clips `sample` (b, c, f, h, w) under prompts (b, n, d); an SDXL
        UNet also takes its added conditioning per clip (`text_embeds` (b, d'), `time_ids`
        (b, 6)), which every frame of the clip gets."""
        batch, _, num_frames = sample.shape[:3]
        # Left set on return: checkpointed blocks are recomputed during backward.
        self.context.num_frames = num_frames
        frames = rearrange(sample, "b c f h w -> (b f) c h w")
        prompts = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        timestep = per_frame_timestep(timestep, batch, num_frames)
        added = None if added_cond_kwargs is None else {
            name: value.repeat_interleave(num_frames, dim=0)
            for name, value in added_cond_kwargs.items()}
        prediction: torch.Tensor = self.unet(frames, timestep, prompts, added_cond_kwargs=added,
                                             return_dict=False)[0]
        return rearrange(prediction, "(b f) c h w -> b c f h w", f=num_frames)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's blocks; each replay runs with the frame count of its forward."""
        self.unet.enable_gradient_checkpointing(partial(checkpoint_with_frames, self.context))

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def temporal_parameters(self) -> dict[str, nn.Parameter]:
        """The added temporal-attention parameters, named relative to the UNet like the original's
        UNet3D keys (`down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight`)."""
        return {
            name: param
            for name, param in self.unet.named_parameters()
            if any(f".{module}." in name for module in TEMPORAL_MODULES)
        }


def per_frame_timestep(
    timestep: torch.Tensor | float | int, batch: int, num_frames: int
) -> torch.Tensor | float | int:
    """Repeat a per-clip timestep `(b,)` for each frame; scalars broadcast as they are."""
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 1:
        return timestep.expand(batch).repeat_interleave(num_frames)
    return timestep


def checkpoint_with_frames(context: FrameContext, block: Callable[..., Any], *args: Any) -> Any:
    """diffusers' checkpoint call, pinning the frame count for the replay during backward.

    The context alone would do if backward always follows its own forward; pinning keeps
    gradients right even when another forward with other clips runs in between.
    """
    num_frames = context.num_frames

    def run(*inputs: Any) -> Any:
        with context.frames(num_frames):
            return block(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def inflate_unet(unet: UNet2DConditionModel, *, frame_joint_norm: bool = True) -> InflatedUNet:
    """Turn a pretrained 2D UNet, in place, into Tune-A-Video's pseudo-3D UNet.

    `frame_joint_norm=False` keeps the ResNet GroupNorms per frame, which makes each frame's
    output depend only on frames 0..i while the temporal attention is still zero.
    """
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    if any(hasattr(block, "attn_temp") for block in blocks):
        raise ValueError("this UNet is already inflated")
    context = FrameContext()
    sparse_causal = SparseCausalAttnProcessor(context)
    for block in blocks:
        block.attn1.set_processor(sparse_causal)
        add_temporal_attention(block, context)
    if frame_joint_norm:
        swap_in_frame_joint_norms(unet, context)
    return InflatedUNet(unet, context)
