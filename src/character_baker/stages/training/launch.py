"""Re-run a command under `accelerate launch` or `torchrun` for multi-process training.

    code = relaunch(argv, launcher="torchrun", nproc=4)
    if code is not None:          # the launched processes did the work
        return code
    ...                           # this process trains (one process, or already launched)

A process started by either launcher has WORLD_SIZE in its environment, so calling `relaunch`
again inside it returns None instead of launching recursively.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from character_baker.core.errors import UserError

LAUNCHERS = ("accelerate", "torchrun")
DEFAULT_PROGRAM = ("-m", "character_baker")


def in_distributed_launch() -> bool:
    """True inside a process started by torchrun / accelerate launch (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


def launch_command(argv: Sequence[str], *, launcher: str, nproc: int,
                   program: Sequence[str] = DEFAULT_PROGRAM) -> list[str]:
    """The command line that runs `program argv` in `nproc` processes under `launcher`.

    `program` is `("-m", module)` or `(script.py,)`.
    """
    if launcher not in LAUNCHERS:
        raise UserError.single("<command line>", "--launcher", f"unknown launcher {launcher!r}",
                               f"use one of {', '.join(LAUNCHERS)}")
    if nproc < 1:
        raise UserError.single("<command line>", "--nproc", f"{nproc} processes", "use --nproc 1 or more")
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                "--num_machines", "1", "--dynamo_backend", "no"]
        head += ["--multi_gpu"] if nproc > 1 else []
    return [*head, *program, *argv]


def relaunch(argv: Sequence[str], *, launcher: str | None, nproc: int,
             program: Sequence[str] = DEFAULT_PROGRAM, env: dict[str, str] | None = None) -> int | None:
    """Run `argv` under `launcher` and return its exit code; None when this process should do the work itself."""
    if launcher is None or in_distributed_launch():
        return None
    command = launch_command(argv, launcher=launcher, nproc=nproc, program=program)
    return subprocess.call(command, env={**os.environ, **(env or {})})
