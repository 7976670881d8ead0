"""Record the original Tune-A-Video UNet3D's output on tiny random models, for a parity test.

Not part of vedit and never imported by its tests. It runs the original code, which needs
diffusers 0.11.1, so it runs in a venv of its own:

    python3 -m venv /tmp/tav-venv
    /tmp/tav-venv/bin/pip install torch==2.13.0 diffusers==0.11.1 "huggingface_hub<0.14" \
        einops numpy safetensors
    git --git-dir=<mirror of showlab/Tune-A-Video> archive HEAD | tar -x -C /tmp/tav
    PYTHONPATH=/tmp/tav /tmp/tav-venv/bin/python scripts/tav_parity.py

It writes tests/data/tav_parity.safetensors: for each config NAME, the tensors
`NAME/weights/<UNet3D key>`, `NAME/sample`, `NAME/timestep`, `NAME/encoder_hidden_states`,
`NAME/output`, and the config as JSON in the metadata under `NAME/config`.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file
from tuneavideo.models.unet import UNet3DConditionModel

TAV_COMMIT = "7d4a89a2b90067e8d805ef1287beb4e4adf37e18"
OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tav_parity.safetensors"
NUM_FRAMES = 3
BATCH = 2

CONFIGS = {
    # SD 1.x layout: conv projections, one head count for all blocks.
    "sd1": dict(
        sample_size=8,
        block_out_channels=(8, 12),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ),
    # SD 2.x layout: linear projections, a head count per block, upcast attention; an odd
    # height makes the UNet force the upsampling size.
    "sd2": dict(
        sample_size=8,
        block_out_channels=(8, 12),
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=12,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
        use_linear_projection=True,
        upcast_attention=True,
    ),
}
HEIGHT_WIDTH = {"sd1": (8, 8), "sd2": (7, 10)}


def random_unet3d(config: dict, seed: int) -> UNet3DConditionModel:
    """The original UNet3D with every weight perturbed, temporal attention and norms included."""
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(**config).eval()
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return unet


def unique_state_dict(unet: UNet3DConditionModel) -> dict[str, torch.Tensor]:
    """The state dict without aliases: Downsample3D registers one conv as `conv` and `Conv2d_0`."""
    return {
        key: value.contiguous()
        for key, value in unet.state_dict().items()
        if ".Conv2d_0." not in key
    }


def record(name: str, config: dict, seed: int) -> dict[str, torch.Tensor]:
    unet = random_unet3d(config, seed)
    height, width = HEIGHT_WIDTH[name]
    sample = torch.randn(BATCH, 4, NUM_FRAMES, height, width)
    timestep = torch.tensor([17, 503])
    encoder_hidden_states = torch.randn(BATCH, 5, config["cross_attention_dim"])
    with torch.no_grad():
        output = unet(sample, timestep, encoder_hidden_states).sample.contiguous()
    tensors = {f"{name}/weights/{key}": value for key, value in unique_state_dict(unet).items()}
    tensors |= {
        f"{name}/sample": sample,
        f"{name}/timestep": timestep,
        f"{name}/encoder_hidden_states": encoder_hidden_states,
        f"{name}/output": output,
    }
    return tensors


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    metadata = {
        "source": f"showlab/Tune-A-Video@{TAV_COMMIT} UNet3DConditionModel",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "num_frames": str(NUM_FRAMES),
    }
    for seed, (name, config) in enumerate(CONFIGS.items()):
        tensors |= record(name, config, seed)
        metadata[f"{name}/config"] = json.dumps(config)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUTPUT, metadata=metadata)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
