"""Settings of each stage as dataclasses; defaults < `--config` TOML < command-line flags.

A config file holds option names as keys (`frames = 12`, `lora-targets = [...]`), at the top
level or under a table named after the command (`[extract]`, `[tune]`, `[edit]`, `[score]`).
Unknown keys and wrong types are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vedit import tomlio
from vedit.errors import BadInputError, UsageError
from vedit.model_files import DEFAULT_MODEL

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

#: The short side of frames when neither --size nor a base model says otherwise (SD 1.x's).
DEFAULT_SIZE = 512
#: The frames extract takes unless --frames says otherwise (Tune-A-Video took 8 to 24).
DEFAULT_FRAMES = 24
#: The frames the one-shot tune takes on an SDXL base unless --frames says otherwise. vedit's
#: memory predictor fits at most 13 on a 24 GB card at SDXL's native 1024 x 1024 (README's
#: "Base models"; 12 predict 18.2 GB, 22.4 GB reserved): one less leaves it a margin. SDXL's
#: UNet is 2.6 B parameters and its latents are 4x SD 1.5's.
SDXL_DEFAULT_FRAMES = 12
#: Largest frame side vedit accepts; beyond it Stable Diffusion is both useless and out of memory.
MAX_SIDE = 4096
MIN_SIDE = 16
#: Largest LoRA rank: SD's attention projections are 320 to 1280 wide, and a rank near the
#: width is a full update at LoRA's cost (1e9 would only fail allocating).
MAX_RANK = 1024
#: Seeds are kept in TOML records, whose integers are signed 64-bit.
MAX_SEED = 2**63 - 1


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
    if match := re.fullmatch(r"([0-9]+)", value):  # ASCII digits, not full-width ones
        sides = [int(match.group(1))]
        size = FrameSize(short_side=sides[0])
    elif match := re.fullmatch(r"([0-9]+)x([0-9]+)", value):
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


#: The projections a LoRA target may name, per attention of a transformer block (lora.py).
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTIONS = ("attn1", "attn2")
_SHORT = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0", "to_out": "to_out.0"}


def parse_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Normalise `--lora-targets`: `attn1.to_q`, `to_q` (both attentions) or `q`/`k`/`v`/`out`."""
    targets: list[str] = []
    for raw in names:
        for name in (part.strip() for part in raw.split(",") if part.strip()):
            if name.startswith("attn"):
                attention, _, projection = name.partition(".")
            else:
                attention, projection = "", name
            projection = _SHORT.get(projection, projection)
            chosen = [attention] if attention else list(ATTENTIONS)
            if projection not in PROJECTIONS or any(a not in ATTENTIONS for a in chosen):
                raise BadInputError(
                    f"--lora-targets: {name!r} is not an attention projection.",
                    "Use q, k, v, out (both attentions) or e.g. attn1.to_q, attn2.to_v.")
            targets += [f"{a}.{projection}" for a in chosen if f"{a}.{projection}" not in targets]
    if not targets:
        raise BadInputError("--lora-targets names no projection.", "The default is q.")
    return tuple(sorted(targets))


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"--seed {seed} is out of range: seeds go from 0 to {MAX_SEED} "
                            "(2^63 - 1).", "Any number in that range repeats its run exactly.")


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid UTF-8: bytes that are not (from a command line in another
    encoding) reach Python as lone surrogates, which no tokenizer or TOML file takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInputError(f"{what} is not valid UTF-8 (at character {exc.start + 1}).",
                            "Give it in UTF-8, e.g. convert with `iconv -t UTF-8`.") from None


def edit_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts an edit renders: stripped, blank ones dropped, each valid UTF-8; at least
    one."""
    kept = [p.strip() for p in prompts if p.strip()]
    if not kept:
        raise BadInputError("edit needs at least one prompt.",
                            'Add --prompt "..." or --prompts-file FILE.')
    for number, prompt in enumerate(kept, 1):
        check_text(prompt, f"Prompt {number} ({prompt!r})" if len(kept) > 1 else "The prompt")
    return kept


@dataclass(frozen=True)
class ExtractSettings:
    """Which frames `extract` takes from a clip and at what size."""

    frames: int | None = None  # None: DEFAULT_FRAMES, or SDXL_DEFAULT_FRAMES with tune on SDXL
    stride: int = 2
    start: float = 0.0
    end: float | None = None
    spread: bool = False
    size: str | None = None  # None: the base model's native size with tune, else DEFAULT_SIZE
    crop: bool = False

    def __post_init__(self) -> None:
        if self.frames is not None and self.frames < 1:
            raise BadInputError(f"--frames {self.frames}: at least one frame is needed.",
                                "Tune-A-Video uses 8 to 24 frames; try --frames 24.")
        if self.stride < 1:
            raise BadInputError(f"--stride {self.stride} must be 1 or more.",
                                "--stride 1 takes every frame, 2 every other one.")
        if not (math.isfinite(self.start) and self.start >= 0):
            raise BadInputError(f"--start {self.start} is not a time in the clip.",
                                "Give seconds from 0.")
        if self.end is not None and not math.isfinite(self.end):
            raise BadInputError(f"--end {self.end} is not a time in the clip.",
                                "Give seconds, or leave --end out for the clip's end.")
        if self.size is not None and not str(self.size).strip():
            raise BadInputError("--size is empty.", "Give the short side (512) or an exact "
                                "WIDTHxHEIGHT (768x432), or leave it out.")
        if self.end is not None and self.end <= self.start:
            raise BadInputError(f"--end {self.end} is not after --start {self.start}.",
                                "Give an end time in seconds after the start.")
        size = self.frame_size
        if self.crop and size.short_side is None:
            raise BadInputError("--crop takes a single --size (the square's side), not WxH.",
                                "Use --crop --size 512, or --size 768x432 without --crop.")

    @property
    def frame_size(self) -> FrameSize:
        return parse_size(DEFAULT_SIZE if self.size is None else self.size)

    @property
    def frame_count(self) -> int:
        return DEFAULT_FRAMES if self.frames is None else self.frames


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class TuneSettings:
    """How `tune` trains. Defaults follow Tune-A-Video's configs, except where LoRA differs.

    `lr` is the original's 3e-5 for the temporal attention, which is trained whole as there;
    LoRA adapters start at zero and move only through their low-rank product, so they get the
    usual LoRA rate `lora_lr` (1e-4, as diffusers' LoRA examples) to cover the same ground in
    the original's 500 steps.
    """

    prompt: str = ""
    model: str = DEFAULT_MODEL
    steps: int = 500
    lr: float = 3e-5
    lora_lr: float = 1e-4
    rank: int = 16
    lora_targets: str = "q"
    batch: int = 1
    grad_accum: int = 1
    seed: int = 33
    mixed_precision: str = "auto"
    gradient_checkpointing: bool | None = None  # None: on with a GPU, off on the CPU
    checkpoint_every: int = 250
    eval: bool = True  # the loss on fixed draws before and after tuning (2 x EVAL_DRAWS forwards)

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} {getattr(self, name)} must be "
                                    "1 or more.", f"The default is {getattr(TuneSettings, name)}.")
        if self.rank > MAX_RANK:
            raise BadInputError(f"--rank {self.rank} is above {MAX_RANK}.",
                                "SD's attention layers are 320 to 1280 wide; Tune-A-Video-like "
                                "tuning needs 4 to 64 (the default is 16).")
        for name in ("lr", "lora_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise BadInputError(f"--{name.replace('_', '-')} must be a finite number "
                                    "above 0.", f"The default is {getattr(TuneSettings, name):g}.")
        if self.checkpoint_every < 0:
            raise BadInputError("--checkpoint-every must be 0 (only at the end) or more.",
                                "The default is 250.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise BadInputError(f"--mixed-precision {self.mixed_precision!r} is not one of "
                                f"{', '.join(MIXED_PRECISION)}.",
                                "auto picks bf16 or fp16 on a GPU.")
        self.targets  # noqa: B018 - parsed once, here: a bad --lora-targets stops before any work
        check_seed(self.seed)
        check_text(self.prompt, "The --prompt")

    @cached_property
    def targets(self) -> tuple[str, ...]:
        """`lora_targets` normalised: `q` is ("attn1.to_q", "attn2.to_q")."""
        return parse_targets([self.lora_targets])


FORMATS = ("mp4", "gif", "frames")
#: DDIM steps past half the 1000 training timesteps gain nothing and, with SD's offset of 1,
#: would step past the last timestep.
MAX_EDIT_STEPS = 500


@dataclass(frozen=True)
class EditSettings:
    """How `edit` renders new prompts. Defaults follow Tune-A-Video: 50 DDIM steps from 50-step
    DDIM-inverted latents, classifier-free guidance 12.5."""

    checkpoint: str | None = None  # None: the latest
    steps: int = 50
    guidance: float = 12.5
    negative_prompt: str = ""
    seed: int = 33
    formats: str = "mp4"
    batch: int = 1
    inversion: bool = True
    inversion_prompt: bool = False  # invert with the source prompt instead of the empty one
    full: bool = False  # every frame of the clip's span, in windows, not only the tuned frames
    window: int | None = None  # with full: frames per UNet call (None: the tuned frame count)
    overlap: int | None = None  # with full: frames neighbouring windows share at least (None:
    # a quarter of the window, and 1 or more)
    full_stride: int | None = None  # with full: source frames between the frames a window
    # holds (None: the tuned frames' spacing)
    score: bool = False  # score each edit as it is written (vedit.score), into edit.toml

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_EDIT_STEPS:
            raise BadInputError(f"--steps {self.steps} must be between 1 and {MAX_EDIT_STEPS}.",
                                "Tune-A-Video uses 50.")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise BadInputError(f"--guidance {self.guidance} is not a number from 0 up.",
                                "1 or less means no guidance; Tune-A-Video uses 12.5.")
        check_seed(self.seed)
        check_text(self.negative_prompt, "The --negative-prompt")
        if self.batch < 1:
            raise BadInputError(f"--batch {self.batch} must be 1 or more.",
                                "It is how many prompts are sampled at once.")
        if not self.full and any(v is not None for v in (self.window, self.overlap,
                                                          self.full_stride)):
            raise UsageError("--window, --overlap and --full-stride go with --full.",
                             "Add --full to edit every frame of the clip in windows.")
        if self.full_stride is not None and self.full_stride < 1:
            raise BadInputError(f"--full-stride {self.full_stride} must be 1 or more.",
                                "1 denoises consecutive frames together; the default is the "
                                "tuned frames' spacing.")
        if self.window is not None and self.window < 1:
            raise BadInputError(f"--window {self.window} must be 1 or more.",
                                "It is how many frames the UNet sees at once.")
        if self.overlap is not None and self.overlap < 0:
            raise BadInputError(f"--overlap {self.overlap} is negative.",
                                "Give how many frames neighbouring windows share.")
        unknown = set(self.format_list) - set(FORMATS)
        if unknown:
            raise BadInputError(f"--formats: unknown {', '.join(sorted(unknown))}.",
                                f"Choose from {', '.join(FORMATS)} (comma-separated).")

    @property
    def format_list(self) -> list[str]:
        return [f.strip().lower() for f in self.formats.split(",") if f.strip()]


@dataclass(frozen=True)
class ScoreSettings:
    """Which CLIP `score` (and `edit --score`) uses. None: OpenAI's CLIP ViT-L/14, whose
    metrics are null (with a notice) when it was never fetched; a model named here must be on
    disk."""

    clip_model: str | None = None


#: The tables a config file may have, each with one command's settings; one file serves all.
TABLES: dict[str, type] = {"extract": ExtractSettings, "tune": TuneSettings, "edit": EditSettings,
                           "score": ScoreSettings}


def read_config(path: Path, *, named_by: str = "--config") -> dict[str, dict[str, Any]]:
    """Parse a config file into its top-level keys (under "") and its tables.

    A table's keys must be settings of its command and top-level keys settings of some
    command, so a typo is never ignored (in a --config file as in the user's defaults file).
    `named_by` says where the path came from, for the hint."""
    try:
        data = tomlio.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"Config file {path} does not exist.",
                            f"Check the {named_by} path.") from None
    except (tomlio.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"Config file {path} is not valid TOML: {exc}.",
                            "See https://toml.io for the syntax.") from None
    config = {"": {_field_name(k): v for k, v in data.items() if not isinstance(v, dict)}}
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        if name not in TABLES:
            raise BadInputError(f"Config file {path} has an unknown table [{name}].",
                                f"vedit reads the tables {', '.join(TABLES)}.")
        config[name] = {_field_name(k): v for k, v in table.items()}
        check_known(config[name], TABLES[name], where=f"[{name}] of {path}")
    check_known(config[""], *TABLES.values(), where=str(path))
    return config


def check_known(config: Mapping[str, Any], *classes: type, where: str = "the config") -> None:
    """Refuse keys that none of the settings `classes` has."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        names = ", ".join(k.replace("_", "-") for k in unknown)
        raise BadInputError(f"Unknown setting(s) in {where}: {names}.",
                            "Known: " + ", ".join(sorted(k.replace("_", "-") for k in known)) + ".")


def config_values(path: Path | None, sections: Sequence[str]) -> dict[str, Any]:
    """The values a command reads: the user's defaults file, then a --config file; in each,
    the top-level keys overlaid by the tables named in `sections`."""
    layers = []
    user = user_config_path()
    named = bool(os.environ.get("VEDIT_CONFIG"))
    if named or user.is_file():  # a file that VEDIT_CONFIG names must be there
        layers.append(read_config(user, named_by="VEDIT_CONFIG" if named else "user config"))
    if path is not None:
        layers.append(read_config(path))
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer[""])
        for name in sections:
            values.update(layer.get(name, {}))
    return values


def resolve(cls: type[T], *layers: Mapping[str, Any] | None,
            overrides: Mapping[str, Any] | None = None) -> T:
    """Build settings from the defaults, then each layer of values in turn (a recorded run, the
    user's config, a --config file), then the non-None `overrides` (command-line flags)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        for layer in layers:
            if layer and field.name in layer:
                values[field.name] = _coerce(field.name, layer[field.name], hints[field.name])
        if overrides and overrides.get(field.name) is not None:
            values[field.name] = overrides[field.name]
    return cls(**values)


def user_config_path() -> Path:
    """The user's own defaults: $VEDIT_CONFIG, else $XDG_CONFIG_HOME/vedit/config.toml."""
    if os.environ.get("VEDIT_CONFIG"):
        return Path(os.environ["VEDIT_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "vedit" / "config.toml"


def as_record(settings: DataclassInstance) -> dict[str, Any]:
    """Settings as a plain dict for the project record and `--json`."""
    return dataclasses.asdict(settings)


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
    elif isinstance(value, list) and str in allowed and all(isinstance(v, str) for v in value):
        return ",".join(value)
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
