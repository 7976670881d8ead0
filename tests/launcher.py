"""Run the real `vedit` command under `accelerate launch` with several CPU processes (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on, so two launches (or a leftover one) never share a rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_vedit(*args: str | Path, processes: int = 2,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    launcher = Path(sys.executable).with_name("accelerate")
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vedit",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
