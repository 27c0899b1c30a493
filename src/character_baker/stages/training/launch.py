"""Re-run a command under `accelerate launch` or `torchrun` for multi-process training.

    code = relaunch(argv, launcher="torchrun", nproc=4)
    if code is not None:          # the launched processes did the work
        return code
    ...                           # this process trains (one process, or already launched)

A process started by either launcher has WORLD_SIZE in its environment, so calling `relaunch`
again inside it returns None instead of launching recursively.

No process outlives the one it was started by: the launcher runs through this module
(`python -m character_baker.stages.training.launch MODULE ARGS`), which asks the kernel for a
SIGTERM when the command that started it ends, however it ends (SIGKILL included); each worker
asks for a SIGKILL when its launcher ends. Both launchers start every worker in a session of its
own, so without this a killed command would leave the launcher and its workers training on,
writing into the run directory that the rerun then trains in as well. (Linux only: elsewhere
the processes are only tied by the launchers' own signal forwarding.)
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from typing import Sequence

from character_baker.core.errors import UserError

LAUNCHERS = ("accelerate", "torchrun")
DEFAULT_PROGRAM = ("-m", "character_baker")
LAUNCHER_MODULES = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch"}
PARENT_PID = "CHARACTER_BAKER_PARENT_PID"  # the process that started this one (set for the launcher and its workers)
_PR_SET_PDEATHSIG = 1


def in_distributed_launch() -> bool:
    """True inside a process started by torchrun / accelerate launch (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


def end_with_parent(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent ends (Linux); exit now if it already has.

    The parent is the process named by CHARACTER_BAKER_PARENT_PID; without that variable nothing changes.
    """
    parent = os.environ.get(PARENT_PID)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != int(parent):  # it ended before the request took effect
        os._exit(128 + int(sig))


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
    head = [sys.executable, "-m", __name__, LAUNCHER_MODULES[launcher]]
    if launcher == "torchrun":
        head += ["--standalone", "--nproc_per_node", str(nproc)]
    else:
        head += ["--num_processes", str(nproc), "--num_machines", "1", "--dynamo_backend", "no"]
        head += ["--multi_gpu"] if nproc > 1 else []
    return [*head, *program, *argv]


def without_launch_options(argv: Sequence[str]) -> list[str]:
    """`argv` less `--launcher X` and `--nproc N` (torchrun's parser would take `--nproc` for its own option)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--launcher", "--nproc"):
            skip = True
        elif not arg.startswith(("--launcher=", "--nproc=")):
            kept.append(arg)
    return kept


def relaunch(argv: Sequence[str], *, launcher: str | None, nproc: int,
             program: Sequence[str] = DEFAULT_PROGRAM, env: dict[str, str] | None = None) -> int | None:
    """Run `argv` (less its launch options) under `launcher` and return its exit code; None when this
    process should do the work itself.

    Inside a launched worker it also ties the worker's life to its launcher's (`end_with_parent`).
    """
    if in_distributed_launch() or launcher is None:
        end_with_parent(signal.SIGKILL)  # a launched worker (accelerate's one-process launcher sets no WORLD_SIZE)
        return None
    command = launch_command(without_launch_options(argv), launcher=launcher, nproc=nproc, program=program)
    return subprocess.call(command, env={**os.environ, **(env or {}), PARENT_PID: str(os.getpid())})


def main(argv: Sequence[str]) -> None:
    """`python -m character_baker.stages.training.launch MODULE ARGS`: run a launcher that ends with its caller."""
    end_with_parent(signal.SIGTERM)  # the launcher stops its workers on SIGTERM
    os.environ[PARENT_PID] = str(os.getpid())  # for the workers
    module, *rest = argv
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
