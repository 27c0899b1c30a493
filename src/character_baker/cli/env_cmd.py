"""`character-baker env`: versions and devices for bug reports."""

from __future__ import annotations

import platform


from character_baker.cli.common import JsonOption, console


def collect_env() -> dict[str, str]:
    """Versions of the package, Python, key libraries, CUDA and the devices."""
    from importlib import metadata

    from character_baker import __version__

    info = {"character-baker": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "pydantic", "typer", "vllm"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    import torch

    info["cuda (torch build)"] = torch.version.cuda or "none (CPU build)"
    info["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        info["devices"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["devices"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def env(as_json: bool = JsonOption) -> None:
    """Print package, torch, transformers, peft, CUDA and device versions for bug reports."""
    info = collect_env()
    if as_json:
        import json

        console.print_json(json.dumps(info))
        return
    from rich.table import Table

    table = Table(title="character-baker environment", show_header=False)
    for key, value in info.items():
        table.add_row(key, value)
    console.print(table)
