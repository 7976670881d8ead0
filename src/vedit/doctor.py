"""`vedit doctor`: what this machine can do for vedit, each line ok, warning or error with a hint.

Errors are what vedit cannot work without (a library, the H.264 or AAC encoder); warnings
are what makes it slow or small (no GPU, little memory or disk, no model downloaded yet).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "warning", "error"]
PACKAGES = ("vedit", "torch", "diffusers", "transformers", "peft", "accelerate", "av",
            "huggingface_hub", "safetensors")
ENCODERS = {"libx264": "H.264 video (edits, remux)", "aac": "AAC sound (remux)"}
LOW_DISK_GB = 10.0
LOW_GPU_GB = 8.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_checks() -> list[Check]:
    """Every check, in the order a user reads them; free disk is measured where the command
    runs, where a project goes by default."""
    checks = [Check("python", "ok", platform.python_version())]
    checks += [_package(name) for name in PACKAGES]
    if any(c.status == "error" for c in checks):
        return checks  # the rest needs the libraries
    checks += _device()
    checks += [_encoder(name, use) for name, use in ENCODERS.items()]
    checks += [_models(), _disk(Path.cwd())]
    return checks


def device_name() -> str:
    """`cpu`, or `cuda: <the GPU's name>`."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    return "cpu"


def _package(name: str) -> Check:
    try:
        return Check(name, "ok", importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return Check(name, "error", "not installed", "Reinstall vedit: pip install -e .")


def _device() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("device", "warning", f"CPU only ({torch.get_num_threads()} threads)",
                      "Everything runs, slowly; tuning wants a CUDA GPU.")]
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    name = torch.cuda.get_device_name(index)
    memory = Check("gpu memory", "ok" if total / 2**30 >= LOW_GPU_GB else "warning",
                   f"{free / 2**30:.1f} GB free of {total / 2**30:.1f} GB",
                   "" if total / 2**30 >= LOW_GPU_GB else
                   "Use fewer frames and a smaller --size; keep gradient checkpointing on.")
    from vedit.models import native_bf16

    bf16 = native_bf16()
    precision = Check("precision", "ok", "bf16 and fp16" if bf16 else "fp16 (no bf16)",
                      "" if bf16 else "Mixed precision uses fp16, which can overflow; "
                      "lower --lr if the loss becomes nan.")
    return [Check("device", "ok", f"cuda: {name}, {torch.version.cuda or '?'}"), memory,
            precision, _attention_kernels()]


def _attention_kernels() -> Check:
    """Which scaled-dot-product-attention kernels run here, tried on a small fp16 problem."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query = torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.float16)
    working = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(query, query, query)
            working.append(backend.name.lower())
        except RuntimeError:
            pass
    if working:
        return Check("attention", "ok", ", ".join(working))
    return Check("attention", "warning", "only the plain math kernel",
                 "Attention will use more memory; update torch for flash attention.")


def _encoder(name: str, use: str) -> Check:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises several kinds for a missing codec
        return Check(f"encoder {name}", "error", f"missing: no {use}",
                     "Install PyAV from PyPI (its wheels bundle FFmpeg with x264 and AAC).")
    return Check(f"encoder {name}", "ok", f"{use}, FFmpeg {_ffmpeg_version()}")


def _ffmpeg_version() -> str:
    import av

    return str(getattr(av, "ffmpeg_version_info", "") or
               av.library_versions.get("libavcodec", "?"))


def _models() -> Check:
    from vedit.hub import list_models
    from vedit.model_files import hub_cache_dir

    found = list_models()
    where = str(hub_cache_dir())
    if not found:
        return Check("models", "warning", f"none yet in {where}",
                     "Run `vedit fetch-models` (about 2.7 GB), or `vedit demo` to try the "
                     "chain with a tiny built-in model.")
    listed = ", ".join(f"{m.name} ({m.size_bytes / 1e9:.1f} GB)" for m in found)
    return Check("models", "ok", f"{listed} in {where}")


def _disk(folder: Path) -> Check:
    probe = folder if folder.exists() else folder.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    detail = f"{free_gb:.1f} GB free in {probe.resolve()}"
    if free_gb < LOW_DISK_GB:
        return Check("disk", "warning", detail,
                     "A model takes 2.7 GB and each project a few hundred MB; free some space.")
    return Check("disk", "ok", detail)
