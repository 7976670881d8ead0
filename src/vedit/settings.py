"""Settings of each stage as dataclasses; defaults < `--config` TOML < command-line flags.

A config file holds option names as keys (`frames = 12`, `lora-targets = [...]`), at the top
level or under a table named after the command (`[extract]`, `[tune]`, `[edit]`). Unknown
keys and wrong types are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vedit import tomlio
from vedit.errors import BadInputError

T = TypeVar("T")

#: Largest frame side vedit accepts; beyond it Stable Diffusion is both useless and out of memory.
MAX_SIDE = 4096
MIN_SIDE = 16


@dataclass(frozen=True)
class FrameSize:
    """How frames are sized: a short side with the aspect kept, or an exact width x height."""

    short_side: int | None = None
    width: int | None = None
    height: int | None = None

    def __str__(self) -> str:
        return f"{self.width}x{self.height}" if self.short_side is None else str(self.short_side)


def parse_size(text: str | int) -> FrameSize:
    """Parse `--size`: `512` (short side) or `768x432` (exact); sides are multiples of 8."""
    value = str(text).strip().lower()
    if match := re.fullmatch(r"(\d+)", value):
        sides = [int(match.group(1))]
        size = FrameSize(short_side=sides[0])
    elif match := re.fullmatch(r"(\d+)x(\d+)", value):
        sides = [int(match.group(1)), int(match.group(2))]
        size = FrameSize(width=sides[0], height=sides[1])
    else:
        raise BadInputError(f"--size {text!r} is not a size.",
                            "Give the short side (512) or an exact WIDTHxHEIGHT (768x432).")
    for side in sides:
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise BadInputError(f"--size {text} is out of range ({MIN_SIDE} to {MAX_SIDE} pixels).",
                                "Stable Diffusion 1.x works at 512, 2.x at 768.")
        if side % 8:
            raise BadInputError(f"--size {text}: {side} is not a multiple of 8.",
                                f"The VAE needs multiples of 8; try {round(side / 8) * 8 or 8}.")
    return size


@dataclass(frozen=True)
class ExtractSettings:
    """Which frames `extract` takes from a clip and at what size."""

    frames: int = 24
    stride: int = 2
    start: float = 0.0
    end: float | None = None
    spread: bool = False
    size: str = "512"
    crop: bool = False

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise BadInputError(f"--frames {self.frames}: at least one frame is needed.",
                                "Tune-A-Video uses 8 to 24 frames; try --frames 24.")
        if self.stride < 1:
            raise BadInputError(f"--stride {self.stride} must be 1 or more.",
                                "--stride 1 takes every frame, 2 every other one.")
        if self.start < 0:
            raise BadInputError(f"--start {self.start} is negative.", "Give seconds from 0.")
        if self.end is not None and self.end <= self.start:
            raise BadInputError(f"--end {self.end} is not after --start {self.start}.",
                                "Give an end time in seconds after the start.")
        size = parse_size(self.size)
        if self.crop and size.short_side is None:
            raise BadInputError("--crop takes a single --size (the square's side), not WxH.",
                                "Use --crop --size 512, or --size 768x432 without --crop.")

    @property
    def frame_size(self) -> FrameSize:
        return parse_size(self.size)


def load_config(path: Path, sections: Sequence[str]) -> dict[str, Any]:
    """Read a config TOML: its top-level keys overlaid by those of the named tables, in order."""
    try:
        data = tomlio.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"Config file {path} does not exist.",
                            "Check the --config path.") from None
    except (tomlio.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"Config file {path} is not valid TOML: {exc}.",
                            "See https://toml.io for the syntax.") from None
    merged = {key: value for key, value in data.items() if not isinstance(value, dict)}
    for name in sections:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise BadInputError(f"Config file {path}: `{name}` must be a table.",
                                f"Write it as [{name}] followed by its keys.")
        merged.update(table)
    unknown_tables = [k for k, v in data.items() if isinstance(v, dict) and k not in sections]
    if unknown_tables:
        raise BadInputError(f"Config file {path} has unknown table(s) {', '.join(unknown_tables)}.",
                            f"This command reads {', '.join(sections)}.")
    return {_field_name(key): value for key, value in merged.items()}


def check_known(config: Mapping[str, Any], *classes: type) -> None:
    """Refuse config keys that no settings class of the command knows."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        names = ", ".join(k.replace("_", "-") for k in unknown)
        raise BadInputError(f"Unknown setting(s) in the config: {names}.",
                            "Known: " + ", ".join(sorted(k.replace("_", "-") for k in known)) + ".")


def resolve(cls: type[T], config: Mapping[str, Any] | None = None,
            overrides: Mapping[str, Any] | None = None) -> T:
    """Build settings from defaults, then `config` values, then non-None `overrides`."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if config and field.name in config:
            values[field.name] = _coerce(field.name, config[field.name], hints[field.name])
        if overrides and overrides.get(field.name) is not None:
            values[field.name] = overrides[field.name]
    return cls(**values)


def as_record(settings: object) -> dict[str, Any]:
    """Settings as a plain dict for the project record and `--json`."""
    return dataclasses.asdict(settings)  # type: ignore[call-overload]


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a config value against its field's type; ints widen to floats, ints to size strings."""
    allowed = _types_of(hint)
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, int) and str in allowed:
        return str(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, list) and list in allowed:
        return list(value)
    wanted = " or ".join(sorted(t.__name__ for t in allowed if t is not type(None)))
    raise BadInputError(f"Config setting {name.replace('_', '-')} = {value!r} should be {wanted}.",
                        "Fix the value in the config file.")


def _types_of(hint: Any) -> set[type]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_types_of(arg) for arg in typing.get_args(hint)))
    if origin is not None:
        return {origin}
    return {hint}
