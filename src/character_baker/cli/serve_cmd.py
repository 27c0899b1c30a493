"""`character-baker serve RUN... | FOLDER | MODEL`: an OpenAI-compatible endpoint and a chat page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from character_baker.cli.common import console, err_console

API_KEY_ENV = "CHARACTER_BAKER_API_KEY"
ENGINES = ("auto", "vllm", "transformers")


def _choose_engine(requested: str) -> str:
    """'vllm' or 'transformers' for --engine (auto = vLLM when installed); UserError when unavailable."""
    import importlib.util

    from character_baker.core.errors import UserError
    from character_baker.stages.serving.vllm import vllm_installed

    if requested not in ENGINES:
        raise UserError.single("--engine", "engine", f"unknown engine {requested!r}",
                               f"use one of {', '.join(ENGINES)}")
    if requested == "vllm" and not vllm_installed():
        raise UserError.single("--engine", "vllm", "vLLM is not installed",
                               "pip install 'character-baker[vllm]' (Linux with a CUDA GPU), "
                               "or use --engine transformers")
    engine = requested if requested != "auto" else ("vllm" if vllm_installed() else "transformers")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if engine == "transformers" and missing:
        raise UserError.single("--engine", "transformers", f"the transformers server needs {' and '.join(missing)}",
                               "pip install 'character-baker[serve]'")
    return engine


def _warn_if_exposed(host: str, api_key: Optional[str]) -> None:
    from character_baker.stages.serving.security import is_loopback_host

    if not is_loopback_host(host) and not api_key:
        err_console.print(f"warning: listening on {host} without an API key: anyone who can reach this machine can "
                          f"use the model (set --api-key or {API_KEY_ENV})")


TRANSFORMERS_ONLY = ("--max-tokens", "--max-queue", "--queue-timeout", "--max-body-bytes")


def _serve_vllm(target, host: str, port: int, api_key: Optional[str], max_concurrency: int) -> None:
    from character_baker.stages.serving.vllm import exec_vllm, vllm_argv

    argv = vllm_argv(target, host=host, port=port, max_concurrency=max_concurrency)
    console.print(f"engine: vLLM (it queues and batches requests itself); the chat page, {', '.join(TRANSFORMERS_ONLY)} "
                  "belong to the transformers engine (vLLM checks the API key on /v1 routes only)",
                  markup=False, soft_wrap=True)
    console.print("$ " + " ".join(argv), markup=False, soft_wrap=True)
    exec_vllm(argv, api_key)


def serve(targets: list[str] = typer.Argument(..., metavar="TARGET...", help="What to serve: run directories (or their names under "
                                                       "--runs-root), folders of runs (every run inside), or one "
                                                       "model (Hub id, model folder or .gguf file). Each run is "
                                                       "served under its character's name, on one loaded copy of "
                                                       "each distinct base model.", show_default=False),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Loopback only by default."),
          port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_default=False,
                                                help="Require this key on every route (401 otherwise)."),
          max_tokens: int = typer.Option(1024, "--max-tokens", min=1,
                                         help="Largest max_tokens a request may ask for (400 above it); the "
                                              "answer length when a request names none."),
          max_concurrency: int = typer.Option(256, "--max-concurrency", min=1,
                                              help="Requests decoded together in one batch, per base model; "
                                                   "the rest wait in the queue (vLLM: --max-num-seqs). KV-cache "
                                                   "rows are allocated as requests use them, so a large value "
                                                   "costs memory only under load."),
          max_queue: int = typer.Option(1024, "--max-queue", min=0,
                                        help="Requests that may wait for a decoding row, per base model (it "
                                             "bounds the memory held by waiting requests); a request beyond "
                                             "them gets 429 with Retry-After."),
          queue_timeout: float = typer.Option(300.0, "--queue-timeout", min=0.001,
                                              help="Seconds a request may wait in the queue for a decoding row; "
                                                   "then it gets 503 with Retry-After."),
          max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1,
                                             help="Largest request body; larger ones get 413 (nothing past the "
                                                  "limit is read)."),
          engine: str = typer.Option("auto", "--engine", help="auto (vLLM when installed), vllm or transformers "
                                                              "(our server: continuous batching on transformers)."),
          runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Folder holding run directories.")) -> None:
    """Serve baked characters (or any model) over an OpenAI-compatible API, with a chat page at /."""
    from character_baker.stages.serving.target import resolve_target

    chosen = _choose_engine(engine)
    resolved = resolve_target(targets, engine=chosen, runs_root=runs_root)  # type: ignore[arg-type]
    for note in resolved.notes:
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    _warn_if_exposed(host, api_key)
    if chosen == "vllm":
        _serve_vllm(resolved, host, port, api_key, max_concurrency)
        return
    from character_baker.stages.serving.app import ServeSettings, run_server

    settings = ServeSettings(host=host, port=port, api_key=api_key or None, max_tokens=max_tokens,
                             max_concurrency=max_concurrency, max_queue=max_queue, queue_timeout=queue_timeout,
                             max_body_bytes=max_body_bytes)
    shown_host = f"[{host}]" if ":" in host else host
    console.print(f"serving {', '.join(model.id for model in resolved.models)} on http://{shown_host}:{port}/v1 "
                  f"(chat page: http://{shown_host}:{port}/)", markup=False, soft_wrap=True)
    run_server(resolved, settings)
