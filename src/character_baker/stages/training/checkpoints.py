"""Training checkpoints and the final adapter, written so that a kill never leaves a half-state.

    adapters/<stage>/checkpoint-N/      one per `save_steps` optimiser steps and one at the end
        adapter_config.json             a standard PEFT adapter (loadable on its own)
        adapter_model.safetensors
        trainer_state.pt                LoRA weights by module path, optimizer, scheduler, RNG
                                        states of every process, step, data position
        checkpoint.json                 completion marker: step, data position, fingerprint
    adapters/<stage>/adapter_config.json + adapter_model.safetensors   the final adapter

A checkpoint is written into `checkpoint-N.tmp/` and renamed when complete; a folder without
the marker (or with another run's fingerprint) is ignored on resume. State dicts go through
`torch.distributed.checkpoint.state_dict` with full (gathered) tensors and frozen weights left
out, so the same code saves and loads single-process, DDP and FSDP runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from character_baker.core.runs import ADAPTER_FILES, atomic_write_json, canonical_adapter_config

MARKER = "checkpoint.json"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def complete_checkpoints(stage_dir: Path, fingerprint: str) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint of this run, oldest first."""
    found = []
    for folder in stage_dir.glob("checkpoint-*"):
        match = _NAME.match(folder.name)
        marker = folder / MARKER
        if match and marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
            found.append((int(match.group(1)), folder))
    return sorted(found)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: python, torch CPU, and its own GPU's when it trains on one."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore generators saved by `rng_state` (the GPU's onto `device`, whatever its index was)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints: every visible GPU's state, whichever this rank used
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def trainable_state(scorer: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (gathered, CPU) state dicts of the trainable weights and the optimizer; collective under FSDP."""
    return get_state_dict(scorer, optimizer, options=_FULL)


def save_adapter(peft_model: Any, model_state: dict[str, torch.Tensor], folder: Path, prefix: str = "model.") -> None:
    """Write a standard PEFT adapter folder from a trainable-state dict keyed relative to the scorer."""
    state = {key[len(prefix):]: value for key, value in model_state.items() if key.startswith(prefix)}
    # save_embedding_layers="auto" looks the base model up on the Hub (a network call, and a warning offline).
    peft_model.save_pretrained(str(folder), state_dict=state, save_embedding_layers=False)
    canonical_adapter_config(folder)


def save_checkpoint(stage_dir: Path, step: int, *, peft_model: Any, model_state: dict, optimizer_state: dict,
                    scheduler: Any, rng_states: list, marker: dict, keep: int) -> Path:
    """Write checkpoint-`step` atomically (main process only) and delete all but the newest `keep`."""
    final = stage_dir / f"checkpoint-{step}"
    temporary = stage_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_adapter(peft_model, model_state, temporary)
    torch.save({"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": rng_states, "step": step}, temporary / STATE_FILE)
    atomic_write_json(temporary / MARKER, {**marker, "step": step})
    remove_checkpoint(final)
    os.replace(temporary, final)
    for _, old in complete_checkpoints(stage_dir, marker["fingerprint"])[:-keep]:
        remove_checkpoint(old)
    return final


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder, its marker first: a kill midway leaves a folder that resume ignores."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(folder: Path, *, scorer: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int, world_size: int, device: torch.device, offloaded: Any = None) -> int:
    """Restore weights, optimizer, scheduler and (same world size only) this rank's RNG; return the step.

    Every rank reads the same full state and takes its part (DDP: all of it; FSDP: its shards), so a
    checkpoint also resumes under another process count. `offloaded` (an `OffloadedAdamW`) restores
    its CPU masters and optimizer instead of the scorer's.
    """
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    if offloaded is not None:
        offloaded.load_state_dicts(state["model"], state["optimizer"])
    else:
        set_model_state_dict(scorer, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(scorer, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank], device)
    return int(state["step"])


def copy_adapter(source: Path, stage_dir: Path) -> None:
    """Copy an adapter folder's files into `stage_dir`, each by an atomic rename."""
    import shutil

    with tempfile.TemporaryDirectory(prefix=".adapter.", dir=stage_dir) as scratch:
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, Path(scratch) / name)
            os.replace(Path(scratch) / name, stage_dir / name)


def publish_adapter(stage_dir: Path, peft_model: Any, model_state: dict) -> None:
    """Write the final adapter files into `stage_dir`, each by an atomic rename."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter.", dir=stage_dir) as scratch:
        save_adapter(peft_model, model_state, Path(scratch))
        for name in ADAPTER_FILES:
            os.replace(Path(scratch) / name, stage_dir / name)
