"""vedit: edit a video by text with Stable Diffusion (Tune-A-Video), sound included."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vedit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
