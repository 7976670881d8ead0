"""vedit: edit a video by text with Stable Diffusion (Tune-A-Video), sound included."""


def __getattr__(name: str) -> str:
    """`__version__`, looked up when first asked for: `vedit` starts by importing this package,
    and its signal handlers (`__main__.py`) come only after, so nothing may be slow here."""
    if name != "__version__":
        raise AttributeError(f"module 'vedit' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("vedit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        found = "0.0.0"
    globals()["__version__"] = found
    return found
