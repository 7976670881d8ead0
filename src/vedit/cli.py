"""The `vedit` command line: parse, call one stage function, report. Nothing else lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vedit import __version__
from vedit import extract as extract_stage
from vedit import remux as remux_stage
from vedit.errors import EXIT_CODES, UsageError
from vedit.output import command_output
from vedit.project import default_project_dir
from vedit.settings import ExtractSettings, check_known, load_config, resolve

app = typer.Typer(
    name="vedit",
    help="Edit a video by text with Stable Diffusion (Tune-A-Video), sound included.",
    epilog="Exit codes: " + "; ".join(f"{code} {text.split(' (')[0]}"
                                      for code, text in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command, declared once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notices.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks (also VEDIT_DEBUG=1).")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file of option values; flags given here win.", show_default=False)]

# Frame options, shared by `extract` and (later) the one-shot `tune CLIP`.
_D = ExtractSettings()
FramesOpt = Annotated[int | None, typer.Option(
    "--frames", "-n", help=f"Frames to take.  \\[default: {_D.frames}]", show_default=False)]
StrideOpt = Annotated[int | None, typer.Option(
    "--stride", help=f"Take every K-th source frame.  \\[default: {_D.stride}]",
    show_default=False)]
StartOpt = Annotated[float | None, typer.Option(
    "--start", help=f"Start time, seconds.  \\[default: {_D.start:g}]", show_default=False)]
EndOpt = Annotated[float | None, typer.Option(
    "--end", help="End time, seconds.  \\[default: the clip's end]", show_default=False)]
SpreadOpt = Annotated[bool | None, typer.Option(
    "--spread/--no-spread", help="Spread the frames evenly from --start to --end instead of "
    "every --stride frames.", show_default=False)]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", help=f"Short side in pixels (aspect kept), or WxH exact.  \\[default: {_D.size}]",
    show_default=False)]
CropOpt = Annotated[bool | None, typer.Option(
    "--crop/--no-crop", help="Take the centre square.", show_default=False)]


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


@app.command()
def extract(
    clip: Annotated[Path, typer.Argument(help="The video clip to take frames from.",
                                         show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Project folder.  \\[default: CLIP's name + .vedit, beside it]",
        show_default=False)] = None,
    frames: FramesOpt = None,
    stride: StrideOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    spread: SpreadOpt = None,
    size: SizeOpt = None,
    crop: CropOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Take frames of a clip into a project folder, with its audio and facts."""
    with command_output(json_mode=json_, quiet=quiet, debug=debug) as out:
        settings_file = load_config(config, ["extract"]) if config else {}
        check_known(settings_file, ExtractSettings)
        settings = resolve(ExtractSettings, settings_file, dict(
            frames=frames, stride=stride, start=start, end=end, spread=spread, size=size,
            crop=crop))
        project = output or default_project_dir(clip)
        result = extract_stage.extract(clip, project, settings, out.reporter)
        verb = "Kept" if result.reused else "Wrote"
        sound = f", audio in {result.audio}" if result.audio else ", no audio"
        out.result(result.to_dict(), f"{verb} {len(result.frames)} frames of {result.width}x"
                                     f"{result.height} in {result.project}/frames{sound}.")


@app.command()
def remux(
    project: Annotated[Path, typer.Argument(help="The project folder.", show_default=False)],
    edits: Annotated[list[str] | None, typer.Argument(
        help="Edits to mux.  \\[default: every edit]", show_default=False)] = None,
    video: Annotated[Path | None, typer.Option(
        "--video", help="Mux this video instead of an edit.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="With --video: where to write.  \\[default: VIDEO.final.mp4]",
        show_default=False)] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Put the source clip's original sound back under edits (or any --video)."""
    with command_output(json_mode=json_, quiet=quiet, debug=debug) as out:
        if video is not None and edits:
            raise UsageError("Name edits or give --video, not both.",
                             "`vedit remux P` muxes every edit; --video muxes one other file.")
        results = remux_stage.remux(project, edits, video=video, output=output,
                                    reporter=out.reporter)
        lines = [f"{r.path} ({r.video_duration:.2f} s, audio: {r.audio_mode})" for r in results]
        out.result({"outputs": [r.to_dict() for r in results]}, "\n".join(lines))


def main() -> None:
    """Console-script entry point."""
    app()
