"""Run `vedit` commands one after another in one process, each stopped by a real signal at a
chosen moment, as a Ctrl-C or a `kill` would stop it there.

    python tests/interrupter.py PLAN.json RESULTS.json

PLAN is a list of {"args": [...], "phase": "module:function", "call": N, "signal": "SIGINT"}:
the N-th call of that function sends this process the signal, and the signal's handler stops
the command right there, before the function does anything; a step without "phase" runs its
command to the end (e.g. the `--resume` after the interrupts). RESULTS gets each command's exit
code, in order. One process serves every command, so the interpreter starts only once.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def signalling(function: Callable[..., Any], call: int, signal_number: int) -> Callable[..., Any]:
    """`function`, except that its `call`-th call first sends this process `signal_number`."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signal_number)
        return function(*args, **kwargs)

    return wrapper


def run(args: list[str], phase: str | None, call: int, signal_name: str) -> int:
    from vedit.__main__ import main

    module_name, name = (phase or "vedit.__main__:main").split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    if phase is not None:
        setattr(module, name, signalling(original, call, getattr(signal, signal_name)))
    # A fresh process's handlers: main() leaves both signals ignored as it ends.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = ["vedit", *args]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        setattr(module, name, original)
    return 0


if __name__ == "__main__":
    plan_file, results_file = map(Path, sys.argv[1:3])
    codes = [run(step["args"], step.get("phase"), step.get("call", 0), step.get("signal", ""))
             for step in json.loads(plan_file.read_text())]
    results_file.write_text(json.dumps(codes))
