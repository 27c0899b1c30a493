"""Serving with vLLM: build the `vllm serve` command line for a ServeTarget and exec it.

    argv = vllm_argv(target, host="127.0.0.1", port=8000, max_concurrency=4)
    exec_vllm(argv, api_key)       # replaces this process with `vllm serve ...`

- Merged model (one run): `vllm serve RUN/model --served-model-name NAME`.
- Base + persona LoRAs (one run, or several on one base): `vllm serve BASE --served-model-name
  BASE_ID --enable-lora --lora-modules NAME=RUN/adapters/persona ... --max-lora-rank R
  [--max-loras N]`, every run's adapter under its character's name, R the largest adapter rank
  from the adapter_config.json files (largest of `r` and `rank_pattern`) rounded up to a rank
  vLLM accepts, N the number of adapters when there are several (all may be in one batch).
  Runs on different bases cannot share a vLLM process: that is a UserError naming them.
- `--max-concurrency` becomes `--max-num-seqs` (sequences decoded at once; the rest queue).
- The API key travels in the environment (VLLM_API_KEY), never on the command line where
  other users could read it in the process list. vLLM checks it only on its /v1 routes.
- Model references are resolved to local folders first (the character-baker cache, .gguf
  conversions), so vLLM loads exactly what the transformers engine would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from character_baker.backends.generation.vllm_backend import lora_rank_limit
from character_baker.core.errors import UserError
from character_baker.stages.serving.target import ServedModel, ServeTarget


def vllm_installed() -> bool:
    """Whether the vllm package is importable here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def adapter_rank(adapter: Path) -> int:
    """The largest LoRA rank in an adapter folder's adapter_config.json (`r` and any `rank_pattern`)."""
    config_path = adapter / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        ranks = [int(config["r"]), *(int(rank) for rank in (config.get("rank_pattern") or {}).values())]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError.single(str(config_path), "r", f"cannot read the adapter's LoRA rank ({error})",
                               "point at a PEFT adapter folder whose adapter_config.json has an integer `r`") from None
    return max(ranks)


def _served_weights(target: ServeTarget) -> ServedModel:
    """The one model of the target served without an adapter (vLLM serves one set of weights per process)."""
    plain = [model for model in target.models if model.adapter is None]
    weights = {model.weights for model in target.models}
    if len(weights) != 1 or len(plain) != 1:
        served = "; ".join(f"{model.id}: {model.weights}" + (f" + {model.adapter}" if model.adapter else "")
                           for model in target.models)
        raise UserError.single("serve", "--engine vllm", "vLLM serves one base model per process, with LoRA "
                               f"adapters on it; these need {len(weights)} sets of weights ({served})",
                               "serve runs that share one base and have adapters/persona/ (one process per base), "
                               "or use --engine transformers, which loads each base once")
    return plain[0]


def vllm_argv(target: ServeTarget, *, host: str, port: int, max_concurrency: int) -> list[str]:
    """The `vllm serve` command line for `target` (see the module docstring)."""
    from character_baker.backends.models import resolve_model

    cfg = target.models_config
    weights = _served_weights(target)
    folder = resolve_model(weights.weights, trust_remote_code=cfg.trust_remote_code)
    argv = ["vllm", "serve", str(folder), "--served-model-name", weights.id, "--host", host, "--port", str(port),
            "--max-num-seqs", str(max_concurrency)]
    if cfg.dtype != "auto":
        argv += ["--dtype", cfg.dtype]
    if cfg.trust_remote_code:
        argv.append("--trust-remote-code")
    if cfg.chat_template:
        argv += ["--chat-template", cfg.chat_template]
    adapters = [model for model in target.models if model.adapter is not None]
    if adapters:
        argv += ["--enable-lora", "--lora-modules", *(f"{model.id}={model.adapter}" for model in adapters),
                 "--max-lora-rank", str(lora_rank_limit(max(adapter_rank(model.adapter) for model in adapters)))]
        if len(adapters) > 1:
            argv += ["--max-loras", str(len(adapters))]
    return argv


def vllm_executable() -> str:
    """The `vllm` command of this environment (next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise UserError.single("--engine", "vllm", "vLLM is installed but its `vllm` command is neither next to "
                               f"{sys.executable} nor on PATH", "reinstall vllm, or use --engine transformers")
    return found


def exec_vllm(argv: list[str], api_key: str | None) -> None:
    """Replace this process with `vllm serve` (the API key goes in VLLM_API_KEY, not argv)."""
    environment = dict(os.environ)
    if api_key:
        environment["VLLM_API_KEY"] = api_key
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(vllm_executable(), argv, environment)
