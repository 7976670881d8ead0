"""Static shell completion scripts for bash, zsh and fish, generated from the Typer app.

Static scripts complete instantly (no Python start per Tab) and list exactly the app's
commands and options; `python -m vedit.completions completions/` rewrites them and a test
checks that the committed ones are current.
"""

from __future__ import annotations

import enum
import pathlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

SHELLS = {"bash": "vedit.bash", "zsh": "_vedit", "fish": "vedit.fish"}
HEADER = "vedit completion for {shell}; generated from the app by `python -m vedit.completions`."


@dataclass(frozen=True)
class Opt:
    """One option as completion sees it."""

    names: list[str]
    help: str
    takes_value: bool
    is_path: bool
    choices: list[str]


HELP = Opt(["--help", "-h"], "Show this message and exit", False, False, [])


@dataclass(frozen=True)
class Cmd:
    name: str
    help: str
    options: list[Opt]
    path_arguments: bool


def describe(app: typer.Typer) -> tuple[list[Opt], list[Cmd]]:
    """The app's root options and its commands, from the Click command Typer builds."""
    group = typer.main.get_command(app)
    if not isinstance(group, TyperGroup):
        raise TypeError("completions are for an app with commands")
    root = [_option(p) for p in group.params
            if p.param_type_name == "option" and not getattr(p, "hidden", False)]
    root.append(HELP)
    commands = []
    for name, command in sorted(group.commands.items()):
        options = [_option(p) for p in command.params if p.param_type_name == "option"]
        options.append(HELP)
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        commands.append(Cmd(name, _short(command.help or ""), options,
                            any(_annotation(p) is not None and _is_path(p) for p in arguments)))
    return root, commands


def _option(param: Any) -> Opt:
    names = list(param.opts) + list(param.secondary_opts)
    takes_value = not getattr(param, "is_flag", False)
    return Opt(names, _short(param.help or ""), takes_value, takes_value and _is_path(param),
               _choices(param) if takes_value else [])


def _annotation(param: Any) -> Any:
    descriptor = getattr(param, "type_descriptor", None)
    return getattr(descriptor, "annotation", None)


def _is_path(param: Any) -> bool:
    annotation = _annotation(param)
    if annotation is not None:
        return annotation in (Path, pathlib.PurePath)
    return type(getattr(param, "type", None)).__name__ == "Path"


def _choices(param: Any) -> list[str]:
    annotation = _annotation(param)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return list(getattr(getattr(param, "type", None), "choices", None) or [])


def _short(text: str) -> str:
    """First sentence of a help text, without its default."""
    text = re.sub(r"\s*\[default:[^\]]*\]", "", text)
    text = " ".join(text.split())
    return text.split(". ")[0].rstrip(".")


def render(shell: str, app: typer.Typer | None = None) -> str:
    if app is None:
        from vedit.cli import app as vedit_app

        app = vedit_app
    root, commands = describe(app)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](root, commands)


def _bash(root: list[Opt], commands: list[Cmd]) -> str:
    lines = [f"# {HEADER.format(shell='bash')}", "_vedit() {",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
             '    local cmd="" i',
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in -*) ;; *) cmd="${COMP_WORDS[i]}"; break ;; esac',
             "    done",
             '    case "$cmd" in',
             '        "")',
             f'            if [[ $cur == -* ]]; then words="{_names(root)}"; '
             f'else words="{" ".join(c.name for c in commands)}"; fi',
             '            COMPREPLY=($(compgen -W "$words" -- "$cur")) ;;']
    for command in commands:
        lines.append(f"        {command.name})")
        lines.append('            case "$prev" in')
        for option in command.options:
            if option.is_path:
                action = 'COMPREPLY=($(compgen -f -- "$cur")); return'
            elif option.choices:
                action = f'COMPREPLY=($(compgen -W "{" ".join(option.choices)}" -- "$cur")); return'
            elif option.takes_value:
                action = "return"
            else:
                continue
            lines.append(f"                {'|'.join(option.names)}) {action} ;;")
        lines.append("            esac")
        rest = 'compgen -f -- "$cur"' if command.path_arguments else "true"
        lines.append(f'            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W '
                     f'"{_names(command.options)}" -- "$cur")); else COMPREPLY=($({rest})); fi ;;')
    lines += ["    esac", "}", "complete -o filenames -F _vedit vedit", ""]
    return "\n".join(lines)


def _zsh_spec(option: Opt) -> str:
    help_text = option.help.replace("'", "").replace("[", "(").replace("]", ")").replace(":", "")
    value = ""
    if option.is_path:
        value = ":path:_files"
    elif option.choices:
        value = f":value:({' '.join(option.choices)})"
    elif option.takes_value:
        value = ":value: "
    if len(option.names) == 1:
        return f"'{option.names[0]}[{help_text}]{value}'"
    exclusive = " ".join(option.names)
    return f"'({exclusive})'{{{','.join(option.names)}}}'[{help_text}]{value}'"


def _zsh(root: list[Opt], commands: list[Cmd]) -> str:
    lines = ["#compdef vedit", f"# {HEADER.format(shell='zsh')}", "_vedit() {",
             "    local line state", "    _arguments -C \\"]
    lines += [f"        {_zsh_spec(o)} \\" for o in root]
    lines += ["        '1: :->command' \\", "        '*:: :->args'", "    case $state in",
              "        command)", "            local -a commands", "            commands=("]
    lines += [f"                '{c.name}:{c.help.replace(chr(39), '')}'" for c in commands]
    lines += ["            )", "            _describe 'command' commands ;;", "        args)",
              "            case $line[1] in"]
    for command in commands:
        lines.append(f"                {command.name})")
        lines.append("                    _arguments \\")
        lines += [f"                        {_zsh_spec(o)} \\" for o in command.options]
        files = "_files" if command.path_arguments else " "
        lines.append(f"                        '*:file:{files}' ;;")
    lines += ["            esac ;;", "    esac", "}", '_vedit "$@"', ""]
    return "\n".join(lines)


def _fish(root: list[Opt], commands: list[Cmd]) -> str:
    lines = [f"# {HEADER.format(shell='fish')}", "complete -c vedit -f"]
    for option in root:
        lines.append(f"complete -c vedit -n __fish_use_subcommand {_fish_names(option)}")
    for command in commands:
        lines.append(f"complete -c vedit -n __fish_use_subcommand -a {command.name} "
                     f"-d {_fish_quote(command.help)}")
    for command in commands:
        seen = f"-n '__fish_seen_subcommand_from {command.name}'"
        for option in command.options:
            lines.append(f"complete -c vedit {seen} {_fish_names(option)}")
        if command.path_arguments:
            lines.append(f"complete -c vedit {seen} -F")
    return "\n".join(lines) + "\n"


def _fish_names(option: Opt) -> str:
    parts = []
    for name in option.names:
        parts.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
    if option.is_path:
        parts.append("-r -F")
    elif option.choices:
        parts.append(f"-x -a {_fish_quote(' '.join(option.choices))}")
    elif option.takes_value:
        parts.append("-x")
    parts.append(f"-d {_fish_quote(option.help)}")
    return " ".join(parts)


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _names(options: list[Opt]) -> str:
    return " ".join(name for option in options for name in option.names)


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        (folder / name).write_text(render(shell), encoding="utf-8")
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(path)
