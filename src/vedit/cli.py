"""The `vedit` command line: parse, call one stage function, report. Nothing else lives here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from vedit import __version__
from vedit.clip_models import DEFAULT_CLIP_MODEL, SCORING_MODELS
from vedit.errors import EXIT_CODES, EnvironmentProblem, UsageError
from vedit.model_files import DEFAULT_MODEL, CachedModel, ModelSource
from vedit.output import Output, with_output
from vedit.progress import Reporter
from vedit.project import (
    EXTRACT_SECTIONS,
    TUNE_SECTIONS,
    Project,
    default_project_dir,
    locked_early,
)
from vedit.settings import (
    DEFAULT_FRAMES,
    DEFAULT_SIZE,
    SDXL_DEFAULT_FRAMES,
    EditSettings,
    ExtractSettings,
    ScoreSettings,
    TuneSettings,
    config_values,
    edit_prompts,
    resolve,
)

if TYPE_CHECKING:
    from typer._click import Context, Parameter  # Typer's own copy of click: its types

    from vedit.memory.predict import MemoryPrediction
    from vedit.tune import TuneResult

Body = TypeVar("Body", bound=Callable[..., None])


def _flags_as_flags(params: list[Parameter]) -> list[Parameter]:
    """Show `--json`, not `--json <bool>`, in --help: Typer prints a metavar that is set in
    place of the type, and a flag takes no value to name."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Context) -> list[Parameter]:
        return _flags_as_flags(super().get_params(ctx))

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        """A usage error with `--json` also prints the JSON error document on stdout (Typer
        prints the message on stderr and exits 2 as usual)."""
        from typer._click.exceptions import UsageError as ClickUsageError

        wants_json = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as exc:
            if wants_json:
                error = UsageError(exc.format_message(),
                                   f"See `{ctx.command_path} --help`.")
                print(json.dumps({"error": error.to_dict()}, indent=2), flush=True)
            raise


class _Group(TyperGroup):
    def get_params(self, ctx: Context) -> list[Parameter]:
        return _flags_as_flags(super().get_params(ctx))


app = typer.Typer(
    name="vedit",
    cls=_Group,
    help="Edit a video by text with Stable Diffusion (Tune-A-Video), sound included.",
    epilog="Exit codes: " + "; ".join(f"{code} {text.split(' (')[0]}"
                                      for code, text in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help, not Typer's rich panels: those cut option names and defaults at 80
    # columns (in a pipe too), where Click wraps the help under the name and cuts nothing.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str | None = None) -> Callable[[Body], Body]:
    """Register a command. Its first parameter, `out`, is the command's Output: --json, --quiet
    and --debug are added to its options, and what it raises becomes a message and an exit
    code (output.py)."""

    def register(body: Body) -> Body:
        app.command(name, cls=_Command)(with_output(body))
        return body

    return register


def _ascii_number(kind: type[int] | type[float], name: str) -> Callable[[str], int | float]:
    """A parser of numbers in ASCII digits only: Python's `int()` and `float()` also read
    full-width digits. (Finite, in range: the settings check that, for config files too.)"""

    def parse(text: str) -> int | float:
        if not str(text).isascii():
            raise typer.BadParameter(f"{text!r} is not a number in ASCII digits.")
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a valid {name}.") from None

    parse.__name__ = name  # Typer's metavar, as for a plain int or float option
    return parse


ASCII_INT, ASCII_FLOAT = _ascii_number(int, "integer"), _ascii_number(float, "float")

# Options shared by several commands, declared once.
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of option values; flags given here win.", show_default=False)]

# Frame options, shared by `extract` and the one-shot `tune CLIP`.
FramesOpt = Annotated[int | None, typer.Option(
    "--frames", "-n", help=f"Frames to take.  [default: {DEFAULT_FRAMES}; "
    f"{SDXL_DEFAULT_FRAMES} with tune on an SDXL base]",
    show_default=False, parser=ASCII_INT)]
StrideOpt = Annotated[int | None, typer.Option(
    "--stride", help=f"Take every K-th source frame.  [default: {ExtractSettings.stride}]",
    show_default=False, parser=ASCII_INT)]
StartOpt = Annotated[float | None, typer.Option(
    "--start", help=f"Start time, seconds.  [default: {ExtractSettings.start:g}]",
    show_default=False, parser=ASCII_FLOAT)]
EndOpt = Annotated[float | None, typer.Option(
    "--end", help="End time, seconds.  [default: the clip's end]", show_default=False,
    parser=ASCII_FLOAT)]
SpreadOpt = Annotated[bool | None, typer.Option(
    "--spread/--no-spread", help="Spread the frames evenly from --start to --end instead of "
    "every --stride frames.", show_default=False)]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", help="Short side in pixels (aspect kept), or WxH exact.  [default: the base "
    f"model's native size with tune, else {DEFAULT_SIZE}]", show_default=False)]
CropOpt = Annotated[bool | None, typer.Option(
    "--crop/--no-crop", help="Take the centre square.", show_default=False)]

# The memory prediction, shared by `tune` and `edit`.
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Predict the peak GPU memory, whether it fits and which settings would; "
    "run nothing, write nothing.")]
GpuMemoryOpt = Annotated[float | None, typer.Option(
    "--gpu-memory", help="With --dry-run: predict for a GPU of this many GB.  [default: this "
    "machine's GPU]", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vedit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Edit a video by text with Stable Diffusion (Tune-A-Video), sound included."""


@command()
def demo(
    out: Output,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="A new folder for the demo's files.")] = Path("vedit-demo"),
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Run the chain on a real base model instead of the tiny one.  "
        "[default: a tiny random model built here]", show_default=False)] = None,
    sdxl: Annotated[bool, typer.Option(
        "--sdxl", help="Build the tiny model in SDXL's layout (two text encoders, size ids).")
    ] = False,
) -> None:
    """Run the whole chain offline, on a clip made here. Extract, tune, edit and remux with a
    tiny built-in model (or --model): does vedit work on this machine?"""
    from vedit.demo import run_demo

    result = run_demo(output, model=model, sdxl=sdxl, reporter=out.reporter)
    total = sum(result.seconds.values())
    lines = [f"Done in {total:.0f} s. Watch, with sound:"]
    lines += [f"  {path}" for path in result.final_videos]
    lines += ["Side by side:"] + [f"  {path}" for path in result.compare_videos]
    out.result(result.to_dict(), "\n".join(lines))


@command()
def doctor(out: Output) -> None:
    """Say what this machine can do for vedit. Versions, device, kernels, encoders, models."""
    from vedit.doctor import device_name, run_checks

    checks = run_checks()
    lines = []
    for check in checks:
        lines.append(f"{check.status:8}{check.name:18}{check.detail}")
        if check.hint:
            lines.append(f"{'':26}{check.hint}")
    ok = all(check.status != "error" for check in checks)
    out.result({"ok": ok, "device": device_name() if ok else None,
                "checks": [c.to_dict() for c in checks]},
               "\n".join(lines))
    if not ok:
        raise typer.Exit(EnvironmentProblem.exit_code)


@command("fetch-models")
def fetch_models(
    out: Output,
    model: Annotated[str | None, typer.Argument(
        help="Hub id, local diffusers folder or single-file .safetensors.  [default: "
        f"the user config's model, else {DEFAULT_MODEL}]", show_default=False)] = None,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch, tag or commit of a hub repo.  [default: main]",
        show_default=False)] = None,
    variant: Annotated[str | None, typer.Option(
        "--variant", help="Weights variant, e.g. fp16, where the repo has it.",
        show_default=False)] = None,
    scoring: Annotated[bool, typer.Option(
        "--scoring", help=f"Fetch the models `vedit score` uses: {' and '.join(SCORING_MODELS)} "
        "(with its processor).")] = False,
    list_: Annotated[bool, typer.Option(
        "--list", help="List the models present and their size; download nothing.")] = False,
    configs_only: Annotated[bool, typer.Option(
        "--configs-only", help="Only the configs and tokenizer (a few kB): enough for "
        "`tune --dry-run` and `edit --dry-run` before downloading the weights.")] = False,
) -> None:
    """Download a model, or check a local one. A Stable Diffusion 1.x/2.x model or a CLIP,
    only the files vedit needs."""
    from vedit import hub

    if list_:
        found = hub.list_models()
        rows = [f"{m.name}  {human_size(m.size_bytes)}  {m.path}"
                + ("  (scoring)" if m.role == "scoring" else "") for m in found]
        out.result({"models": [_model_facts(m) for m in found]},
                   "\n".join(rows) or "No models yet: run `vedit fetch-models`.")
        return
    if configs_only and scoring:
        raise UsageError("--configs-only fetches a base model's configs for --dry-run; the "
                         "scoring models are fetched whole.",
                         "Run `vedit fetch-models --scoring` on its own.")
    fetched = []
    if model or not scoring:
        base = model or config_values(None, []).get("model") or DEFAULT_MODEL
        fetched.append(_fetch(base, revision, variant, out.reporter, configs_only))
    if scoring:
        fetched += [_fetch(name, None, None, out.reporter) for name in SCORING_MODELS]
        out.result({"models": [facts for facts, _ in fetched]},
                   "\n".join(text for _, text in fetched))
    else:
        out.result(*fetched[0])


def _fetch(name: str, revision: str | None, variant: str | None, reporter: Reporter,
           configs_only: bool = False) -> tuple[dict[str, object], str]:
    """Fetch one model; its facts for --json and a line for people."""
    from vedit import clip_models, hub, models

    path = hub.fetch_model(name, revision=revision, variant=variant, reporter=reporter,
                           configs_only=configs_only)
    if clip_models.is_clip_folder(path):
        clip = clip_models.resolve_clip(name)
        return clip.to_dict(), (f"{clip.name} is ready in {clip.path} (CLIP, "
                                f"{human_size(clip.size_bytes)}).")
    source = models.resolve_model(name, revision=revision, variant=variant,
                                  configs_only=configs_only)
    parts = ", ".join(f"{c} {info.dtype} {human_size(info.size_bytes)}"
                      for c, info in source.components.items() if info.dtype)
    return (_model_facts(source) | {"fingerprint": source.fingerprint},
            f"{source.name} is ready in {source.path} ({parts}).")


def human_size(size: int) -> str:
    """Bytes as people read them: 3.2 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _model_facts(model: ModelSource | CachedModel) -> dict[str, object]:
    """A model's facts for --json: its dataclass fields (paths become text when printed)."""
    import dataclasses

    return dataclasses.asdict(model)


@command()
def extract(
    out: Output,
    clip: Annotated[Path, typer.Argument(help="The video clip to take frames from.",
                                         show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Project folder.  [default: CLIP's name + .vedit, beside it]",
        show_default=False)] = None,
    frames: FramesOpt = None,
    stride: StrideOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    spread: SpreadOpt = None,
    size: SizeOpt = None,
    crop: CropOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Take frames of a clip into a project folder. Its audio and facts are kept there too."""
    values = config_values(config, ["extract"])
    settings = resolve(ExtractSettings, values, overrides=dict(
        frames=frames, stride=stride, start=start, end=end, spread=spread, size=size,
        crop=crop))
    from vedit.extract import extract as extract_clip

    result = extract_clip(clip, output, settings, out.reporter)
    verb = "Kept" if result.reused else "Wrote"
    sound = f", audio in {result.audio}" if result.audio else ", no audio"
    out.result(result.to_dict(), f"{verb} {len(result.frames)} frames of {result.width}x"
                                 f"{result.height} in {result.project}/frames{sound}.\n"
                                 + extract_span(result.times, result.source.get("duration")))


def extract_span(times: list[float], duration: float | None) -> str:
    """Which part of the clip the frames come from: a default take covers only its start."""
    text = f"The frames span {times[0]:.2f}-{times[-1]:.2f} s"
    if not duration:
        return text + "."
    text += f" of the {duration:.2f} s clip"
    if times[-1] - times[0] < duration / 2:
        text += " (--spread takes them from all of it, --start from later on)"
    return text + "."


@command()
def tune(
    out: Output,
    target: Annotated[Path, typer.Argument(
        metavar="PROJECT_OR_CLIP", help="A project folder, or a clip to extract first.",
        show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="What the clip shows, e.g. 'a man is skiing'.",
        show_default=False)] = None,
    project: Annotated[Path | None, typer.Option(
        "--project", help="With a clip: the project folder.  [default: CLIP.vedit]",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help=f"Base model: hub id, diffusers folder or .safetensors file.  "
        f"[default: {TuneSettings.model}]", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help=f"Total optimizer steps.  [default: {TuneSettings.steps}]",
        show_default=False, parser=ASCII_INT)] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", help=f"Learning rate of the temporal attention.  [default: {TuneSettings.lr:g}]",
        show_default=False, parser=ASCII_FLOAT)] = None,
    lora_lr: Annotated[float | None, typer.Option(
        "--lora-lr", help="Learning rate of the LoRA adapters.  "
        f"[default: {TuneSettings.lora_lr:g}]", show_default=False, parser=ASCII_FLOAT)] = None,
    rank: Annotated[int | None, typer.Option(
        "--rank", help=f"LoRA rank.  [default: {TuneSettings.rank}]", show_default=False,
        parser=ASCII_INT)] = None,
    lora_targets: Annotated[str | None, typer.Option(
        "--lora-targets", help="Projections to adapt: q, k, v, out, or attn1.to_q, attn2.to_v, "
        f"... (comma-separated).  [default: {TuneSettings.lora_targets}]",
        show_default=False)] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", help=f"Noise samples of the clip per step.  [default: {TuneSettings.batch}]",
        show_default=False, parser=ASCII_INT)] = None,
    grad_accum: Annotated[int | None, typer.Option(
        "--grad-accum", help=f"Batches per optimizer step.  [default: {TuneSettings.grad_accum}]",
        show_default=False, parser=ASCII_INT)] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help=f"Random seed.  [default: {TuneSettings.seed}]",
        show_default=False, parser=ASCII_INT)] = None,
    mixed_precision: Annotated[str | None, typer.Option(
        "--mixed-precision", help="auto, no, fp16 or bf16.  [default: auto: bf16 or fp16 "
        "on a GPU, no on the CPU]", show_default=False)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations to save memory.  [default: on with a GPU]",
        show_default=False)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        "--checkpoint-every", help="Save a checkpoint every N steps (0: only at the end).  "
        f"[default: {TuneSettings.checkpoint_every}]", show_default=False,
        parser=ASCII_INT)] = None,
    evaluate: Annotated[bool | None, typer.Option(
        "--eval/--no-eval", help="Report the loss on fixed draws before and after tuning "
        "(16 extra forward passes).  [default: eval]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the latest run from its last checkpoint, with its "
        "settings, to --steps (else a new run starts beside the earlier ones).")] = False,
    frames: FramesOpt = None,
    stride: StrideOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    spread: SpreadOpt = None,
    size: SizeOpt = None,
    crop: CropOpt = None,
    dry_run: DryRunOpt = False,
    gpu_memory: GpuMemoryOpt = None,
    config: ConfigOpt = None,
) -> None:
    """LoRA-tune the inflated UNet on a project's frames. Given a clip, extract them first."""
    from vedit.checkpoints import recorded_settings
    from vedit.video import check_clip

    # Every check that needs no model library comes first, the lock included: a mistyped
    # path, a bad option or a busy project is refused in well under a second.
    _check_gpu_memory(dry_run, gpu_memory)
    if not target.is_dir():
        check_clip(target)
    values = config_values(config, ["extract", "tune"])
    frame_flags = dict(frames=frames, stride=stride, start=start, end=end, spread=spread,
                       size=size, crop=crop)
    flags = dict(
        prompt=prompt, model=model, steps=steps, lr=lr, lora_lr=lora_lr, rank=rank,
        lora_targets=lora_targets, batch=batch, grad_accum=grad_accum, seed=seed,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
        checkpoint_every=checkpoint_every, eval=evaluate)
    opened: Project | None = None
    if target.is_dir():
        if project or any(v is not None for v in frame_flags.values()):
            raise UsageError("Frame options and --project go with a clip, not a project.",
                             "Give the clip instead, or run `vedit extract` again.")
        opened = Project.open(target, replacing=TUNE_SECTIONS)
        settings = resolve(TuneSettings, recorded_settings(opened, resume=resume), values,
                           overrides=flags)
        frame_settings: ExtractSettings | None = None
    else:
        settings = resolve(TuneSettings, values, overrides=flags)
        frame_settings = resolve(ExtractSettings, values, overrides=frame_flags)
    if dry_run:  # a prediction: no lock taken, nothing written
        _tune_dry_run(out, target, settings, frame_settings, gpu_memory)
        return
    result: dict[str, object] = {}
    # The clip form writes the extract sections too; a damaged one is repaired, not refused.
    sections = TUNE_SECTIONS if opened else (*EXTRACT_SECTIONS, *TUNE_SECTIONS)
    with locked_early(opened.root if opened else project or default_project_dir(target),
                      "tune", enabled=not out.secondary, replacing=sections):
        from vedit import tune as tune_stage

        if opened is not None:
            tuned = tune_stage.tune(opened, settings, resume=resume, reporter=out.reporter)
        else:
            extracted, tuned = tune_stage.tune_clip(
                target, settings, frame_settings, project_dir=project, resume=resume,
                reporter=out.reporter)
            result["extract"] = extracted.to_dict()
            target = extracted.project
    result.update(tuned.to_dict())
    text = tune_summary(target, tuned)
    memory = _tune_memory(target, settings, tuned)
    if memory is not None:
        result["memory"] = memory
        text += "\n" + _measured_text(memory)
    out.result(result, text)


def tune_summary(target: Path, tuned: TuneResult) -> str:
    """The human result of tune: what was tuned, the loss it reached, where the checkpoint is."""
    run = f" (run {tuned.run})" if tuned.run else ""
    if tuned.start_step >= tuned.steps:
        return (f"{target} is already tuned to step {tuned.steps}{run}; nothing to do: "
                "give --steps above it to go on.")
    lines = [f"Tuned {target} to step {tuned.steps}{run} in {tuned.seconds:.1f} s."]
    if tuned.eval_loss_after is not None:
        before = (f"{tuned.eval_loss_before:.4f} before, "
                  if tuned.eval_loss_before is not None else "")
        lines.append(f"Loss on fixed draws: {before}{tuned.eval_loss_after:.4f} after.")
    if tuned.checkpoints:
        lines.append(f"Checkpoint: {tuned.checkpoints[-1]}")
        lines.append(f"Next: vedit edit {target} --prompt \"...\"")
    return "\n".join(lines)


def _tune_memory(target: Path, settings: TuneSettings, tuned: TuneResult
                 ) -> dict[str, float] | None:
    """A GPU run's measured peak next to what the predictor says for the same run."""
    if tuned.peak_memory_gb is None or tuned.start_step >= tuned.steps:
        return None
    from vedit.memory.gpu import target_gpu
    from vedit.memory.predict import measured_against_predicted, predict_tune, tune_plan

    plan = tune_plan(target, settings).with_(encodes_frames=not tuned.latents_reused)
    return measured_against_predicted(
        tuned.peak_memory_gb, lambda: predict_tune(plan, target_gpu(), advise=False))


def _tune_dry_run(out: Output, target: Path, settings: TuneSettings,
                  frame_settings: ExtractSettings | None, gpu_memory: float | None) -> None:
    """`tune --dry-run`: the run's predicted memory on the GPU; nothing extracted or written."""
    from vedit.memory.gpu import target_gpu
    from vedit.memory.predict import predict_tune, tune_plan

    plan = tune_plan(target, settings, frame_settings)
    prediction = predict_tune(plan, target_gpu(gpu_memory))
    what = (f"Tuning {plan.frames} frames of {plan.width}x{plan.height}"
            + (" (as extract would take them)" if frame_settings is not None else ""))
    out.result({"dry_run": True, "frames": plan.frames, "width": plan.width,
                "height": plan.height, "memory": prediction.to_dict()},
               _dry_run_text(prediction, what))


@command()
def edit(
    out: Output,
    project: Annotated[Path, typer.Argument(help="The tuned project folder.",
                                            show_default=False)],
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", "-p", help="A prompt to render; repeat for several.",
        show_default=False)] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts-file", help="One prompt a line ('-': stdin); blank lines and # comments "
        "are skipped.", show_default=False, allow_dash=True)] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Edit folder name (numbered for several prompts).  [default: a "
        "slug of the prompt]", show_default=False)] = None,
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="RUN/step-N, a run (its last step), step-N or a folder.  "
        "[default: the latest run's last]", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="DDIM steps, for inversion and sampling.  "
        f"[default: {EditSettings.steps}]", show_default=False, parser=ASCII_INT)] = None,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="Classifier-free guidance scale.  "
        f"[default: {EditSettings.guidance:g}]", show_default=False, parser=ASCII_FLOAT)] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        "--negative-prompt", help="What to steer away from.  [default: none]",
        show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed of the start noise with --no-inversion.  "
        f"[default: {EditSettings.seed}]", show_default=False, parser=ASCII_INT)] = None,
    formats: Annotated[str | None, typer.Option(
        "--formats", help="mp4 (always), gif, frames (PNG), comma-separated.  "
        f"[default: {EditSettings.formats}]", show_default=False)] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", help=f"Prompts sampled at once.  [default: {EditSettings.batch}]",
        show_default=False, parser=ASCII_INT)] = None,
    inversion: Annotated[bool | None, typer.Option(
        "--inversion/--no-inversion", help="Start from the clip's DDIM-inverted noise (or "
        "from seeded random noise).  [default: inversion]", show_default=False)] = None,
    inversion_prompt: Annotated[bool | None, typer.Option(
        "--inversion-prompt/--empty-inversion-prompt", help="Invert with the tuning prompt "
        "instead of the empty one.  [default: empty, as the original]",
        show_default=False)] = None,
    full: Annotated[bool | None, typer.Option(
        "--full/--tuned-frames", help="Edit every frame of the clip's span (extract's "
        "--start/--end) at the source frame rate, in overlapping windows, not only the tuned "
        "frames.  [default: the tuned frames]", show_default=False)] = None,
    window: Annotated[int | None, typer.Option(
        "--window", help="With --full: frames the UNet sees at once.  [default: the tuned "
        "frame count]", show_default=False, parser=ASCII_INT)] = None,
    overlap: Annotated[int | None, typer.Option(
        "--overlap", help="With --full: frames neighbouring windows share at least (frames to "
        "spare lengthen the overlaps evenly).  [default: a quarter of the window, 1 or more]",
        show_default=False, parser=ASCII_INT)] = None,
    full_stride: Annotated[int | None, typer.Option(
        "--full-stride", help="With --full: source frames between the frames a window holds; "
        "every frame is still edited, in interleaved sequences.  [default: the tuned "
        "frames' spacing, e.g. extract's --stride]", show_default=False, parser=ASCII_INT)] = None,
    score: Annotated[bool | None, typer.Option(
        "--score/--no-score", help="Score each edit as `vedit score` does, into its edit.toml "
        "and the result.  [default: no]", show_default=False)] = None,
    dry_run: DryRunOpt = False,
    gpu_memory: GpuMemoryOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Render the tuned clip under new prompts. Each goes into edits/NAME/: video.mp4, the
    side-by-side compare.mp4, edit.toml and the --formats asked."""
    from vedit.prompts import read_prompts

    _check_gpu_memory(dry_run, gpu_memory)

    values = config_values(config, ["edit"])
    settings = resolve(EditSettings, values, overrides=dict(
        checkpoint=checkpoint, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, seed=seed, formats=formats, batch=batch,
        inversion=inversion, inversion_prompt=inversion_prompt, full=full, window=window,
        overlap=overlap, full_stride=full_stride, score=score))
    given = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if dry_run:  # a prediction: needs no prompt's text, takes no lock, writes nothing
        _edit_dry_run(out, project, settings, len([p for p in given if p.strip()]), gpu_memory)
        return
    scoring = resolve(ScoreSettings, config_values(config, ["score"]))
    prompts = edit_prompts(given)
    with locked_early(project, "edit", enabled=not out.secondary):
        from vedit import edit as edit_stage
        from vedit.score import format_metrics

        result = edit_stage.edit(project, prompts, settings, name=name, scoring=scoring,
                                 reporter=out.reporter)
    lines = []
    for e in result.edits:
        lines += [f"{e.files['video']}  ({e.prompt}, {e.frames} frames)",
                  f"  side by side with the source: {e.files['compare']}"]
        if e.scores is not None:
            lines.append(f"  scores: {format_metrics(e.scores)}")
    lines.append(f"Add the clip's sound: vedit remux {project}")
    data = result.to_dict()
    if result.peak_memory_gb is not None:
        from vedit.memory.gpu import target_gpu
        from vedit.memory.predict import edit_plan, measured_against_predicted, predict_edit

        plan = edit_plan(project, settings, prompts=len(prompts))
        memory = measured_against_predicted(
            result.peak_memory_gb, lambda: predict_edit(plan, target_gpu(), advise=False))
        if memory is not None:
            data["memory"] = memory
            lines.append(_measured_text(memory))
    out.result(data, "\n".join(lines))


def _edit_dry_run(out: Output, project: Path, settings: EditSettings, prompts: int,
                  gpu_memory: float | None) -> None:
    """`edit --dry-run`: the edit's predicted memory on the GPU; nothing rendered or written."""
    from vedit.memory.gpu import target_gpu
    from vedit.memory.predict import edit_plan, predict_edit

    plan = edit_plan(project, settings, prompts=prompts)
    prediction = predict_edit(plan, target_gpu(gpu_memory))
    what = (f"Editing {plan.frames} frames of {plan.width}x{plan.height}"
            + (" at a time (--full)" if settings.full else "")
            + f", {plan.settings.batch} prompt(s) at once")
    out.result({"dry_run": True, "frames": plan.frames, "width": plan.width,
                "height": plan.height, "memory": prediction.to_dict()},
               _dry_run_text(prediction, what))


def _check_gpu_memory(dry_run: bool, gpu_memory: float | None) -> None:
    if gpu_memory is not None and not dry_run:
        raise UsageError("--gpu-memory goes with --dry-run: a real run uses the GPU it has.",
                         "Add --dry-run to predict for a GPU of that size.")
    if gpu_memory is not None and gpu_memory <= 0:
        raise UsageError(f"--gpu-memory {gpu_memory:g} is not a size in GB.",
                         "Give the card's memory, e.g. --gpu-memory 24.")


def _dry_run_text(prediction: MemoryPrediction, what: str) -> str:
    """A dry run's report: what would run, the predicted peak, the settings that would fit."""
    lines = [f"{what}: nothing was run or written.", prediction.summary()]
    if prediction.advice:
        lines.append("These would fit:")
        lines += [f"  {a.change}: {a.peak_gb:.1f} GB" for a in prediction.advice]
    return "\n".join(lines)


def _measured_text(memory: dict[str, float]) -> str:
    """The line a real GPU run adds: its peak next to the model's prediction for it."""
    return (f"Peak GPU memory {memory['measured_peak_gb']} GB; the model predicted "
            f"{memory['predicted_peak_gb']} GB ({memory['error_percent']:+}%).")


@command()
def score(
    out: Output,
    target: Annotated[Path, typer.Argument(
        metavar="PROJECT_OR_VIDEO", help="A project (its edits are scored), or a video to score "
        "against --source.", show_default=False)],
    edits: Annotated[list[str] | None, typer.Argument(
        metavar="EDIT", help="With a project: the edits to score.  [default: every edit]",
        show_default=False)] = None,
    source: Annotated[Path | None, typer.Option(
        "--source", help="With a video: the clip it was made from (a video, or a project for its "
        "frames).", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="With a video: the prompt it was made with (for the text "
        "metrics).", show_default=False)] = None,
    clip_model: Annotated[str | None, typer.Option(
        "--clip-model", help=f"CLIP hub id or local folder.  [default: {DEFAULT_CLIP_MODEL}]",
        show_default=False)] = None,
    csv_file: Annotated[Path | None, typer.Option(
        "--csv", help="Also write one row per video to this CSV file.", show_default=False)
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Score edits as video-editing benchmarks do. Flicker, motion, CLIP consistency, CLIP
    text alignment and PickScore."""
    # The option checks come before the metric libraries are imported, as in tune and edit.
    settings = resolve(ScoreSettings, config_values(config, ["score"]),
                       overrides=dict(clip_model=clip_model))
    if source is None:
        if not target.is_dir():
            raise UsageError(f"Scoring the video {target} needs --source CLIP, the clip it "
                             "was made from.", "Or give a project to score its edits.")
        if prompt is not None:
            raise UsageError("--prompt goes with a video and --source; a project's edits "
                             "are scored against their own prompts.", "Drop --prompt.")
    elif edits:
        raise UsageError("EDIT names go with a project, not with --source.",
                         "Score one video against --source at a time.")
    from vedit import score as score_stage

    if source is None:
        results = score_stage.score_project(target, edits, settings, reporter=out.reporter)
    else:
        results = [score_stage.score_video(target, source, prompt, settings,
                                           reporter=out.reporter)]
    if csv_file is not None:
        score_stage.write_csv(csv_file, results)
    out.result({"videos": [r.to_dict() for r in results]},
               score_stage.results_table(results))


@command()
def remux(
    out: Output,
    project: Annotated[Path, typer.Argument(help="The project folder.", show_default=False)],
    edits: Annotated[list[str] | None, typer.Argument(
        help="Edits to mux.  [default: every edit]", show_default=False)] = None,
    video: Annotated[Path | None, typer.Option(
        "--video", help="Mux this video instead of an edit.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="With --video: where to write.  [default: VIDEO.final.mp4]",
        show_default=False)] = None,
) -> None:
    """Put the source clip's sound back under edits. Or under any other --video."""
    from vedit.remux import remux as remux_project

    results = remux_project(project, edits, video=video, output=output,
                            reporter=out.reporter)
    lines = [f"{r.path} ({r.video_duration:.2f} s, audio: {r.audio_mode})" for r in results]
    out.result({"outputs": [r.to_dict() for r in results]}, "\n".join(lines))


@command()
def status(
    out: Output,
    project: Annotated[Path, typer.Argument(help="The project folder.", show_default=False)],
) -> None:
    """Say what a project holds and what is stale. Also what is damaged, and what the next
    command would reuse."""
    from vedit.status import describe, project_status

    found = project_status(project)
    out.result(found.to_dict(), describe(found))
