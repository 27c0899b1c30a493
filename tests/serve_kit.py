"""Helpers the serve tests share: run directories with answer-changing persona adapters, a free port,
the server under test in a thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PIRATE = Path(__file__).resolve().parents[1] / "constitutions" / "pirate.yaml"


def make_run(runs_root: Path, base_dir: Path, name: str = "pirate", *, seed: int = 0, rank: int = 8,
             constitution: Path = PIRATE, constitution_name: str | None = None) -> Path:
    """A run directory as train leaves it: manifest (recipe, constitution) and adapters/persona/."""
    import torch

    from character_baker.backends.models import attach_lora
    from character_baker.core.config import LoraConfig, ModelsConfig, Recipe
    from character_baker.core.constitution import load_constitution
    from character_baker.core.runs import RunDir
    from character_baker.testing import tiny_model, tiny_tokenizer

    run = RunDir.create(runs_root / name)
    model = attach_lora(tiny_model("llama", tiny_tokenizer()), LoraConfig(r=rank, alpha=2 * rank), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh adapter is the identity (B = 0): give it weights that change answers
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(run.path("adapters", "persona"))
    recipe = Recipe(models=ModelsConfig(base=str(base_dir), device="cpu"))
    run.update_manifest(recipe=recipe.model_dump(mode="json"),
                        constitution={"name": constitution_name or name, "path": str(constitution),
                                      "hash": load_constitution(constitution).content_hash()})
    return run.root


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def app_in_thread(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()


def wait_until_healthy(url: str, process, log: Path, key: str, timeout_s: float = 120.0) -> None:
    """Poll /health until it answers 200; fail with the server's output if it exits or times out."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"serve did not become healthy in {timeout_s}s:\n{log.read_text()}")


@contextmanager
def cli_server(arguments: list[str], root: Path, key: str) -> Iterator[str]:
    """`character-baker serve ARGUMENTS` in a subprocess on a free loopback port (the key in its
    environment, offline, its own model cache); yields its base URL and stops it afterwards."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "CHARACTER_BAKER_API_KEY": key, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CHARACTER_BAKER_CACHE": str(root / "cache")}
    log = root / "serve.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "character_baker", "serve", *arguments, "--engine",
                                    "transformers", "--port", str(port)], env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log, key)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
