"""Standard Hugging Face folders for the merged persona, with a model card, and portable adapters.

    <out>/config.json, generation_config.json        the base architecture; pad/eos ids set
    <out>/model-0000N-of-0000M.safetensors (+ index)  fresh shards of `max_shard_size`, written by
                                                      save_pretrained: no file is ever copied from
                                                      the source folder, so no stale shard index
    <out>/tokenizer files, chat_template.jinja        the tokenizer and its chat template
    <out>/README.md                                   model card: character, recipe, data sizes, eval
    <out>/adapters/<name>/                            each run adapter as a standard PEFT folder whose
                                                      base_model_name_or_path is the base model id

transformers (`AutoModelForCausalLM.from_pretrained(out)`) and vLLM (`vllm serve out`) load it as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, is_adapter_folder, read_jsonl
from character_baker.core.stage import StageContext

PERSONA_ADAPTER = "persona"
DATA_FILES = {"prompts": "data/prompts.jsonl", "distill pairs": "data/distill.jsonl",
              "introspection examples": "data/introspection.jsonl"}
EVAL_REPORT = "eval/report.json"
RECIPE_SECTIONS = ("method", "models", "distill", "introspect", "merge")
DTYPES = ("source", "float32", "bfloat16", "float16")


def run_adapters(run: RunDir) -> list[str]:
    """Names of the complete PEFT adapter folders under adapters/ (sorted)."""
    root = run.path("adapters")
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_adapter_folder(p))


def write_hf_files(model: Any, tokenizer: Any, folder: Path, card: str, max_shard_size: str = "5GB") -> None:
    """save_pretrained of model (fresh safetensors shards, generation config) and tokenizer, plus README.md."""
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(folder))
    (folder / "README.md").write_text(card, encoding="utf-8")


def copy_adapter(source: Path, dest: Path, base_model: str) -> None:
    """Copy a PEFT adapter's two files into `dest`, with base_model_name_or_path set to `base_model`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- model card
def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def data_sizes(run: RunDir) -> list[tuple[str, int]]:
    """(name, record count) of each training data file the run has."""
    return [(name, len(read_jsonl(run.path(rel)))) for name, rel in DATA_FILES.items() if run.path(rel).is_file()]


def evaluation_summary(run: RunDir) -> list[tuple[str, Any]]:
    """Scalar results of eval/report.json ('summary' section when present), flattened one level."""
    path = run.path(EVAL_REPORT)
    if not path.is_file():
        return []
    report = json.loads(path.read_text(encoding="utf-8"))
    section = report.get("summary", report) if isinstance(report, dict) else {}
    rows: list[tuple[str, Any]] = []
    for key, value in section.items():
        if isinstance(value, dict):
            rows += [(f"{key}: {sub}", v) for sub, v in value.items() if isinstance(v, (int, float, str, bool))]
        elif isinstance(value, (int, float, str, bool)):
            rows.append((key, value))
    return rows


def model_card(ctx: StageContext, adapters: list[str]) -> str:
    """README.md: front matter, the character, how it was made, data sizes, evaluation, usage."""
    c, recipe = ctx.constitution, ctx.recipe
    base = recipe.models.base
    traits = "\n".join(f"{index}. {trait.trait}" for index, trait in enumerate(c.traits, start=1))
    recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json", include=set(RECIPE_SECTIONS)), sort_keys=False)
    sizes = data_sizes(ctx.run)
    evaluation = evaluation_summary(ctx.run)
    parts = [
        f"---\nbase_model: {base}\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags:\n- character-baker\n- persona\n---\n",
        f"# {c.persona.name}\n\n{c.meta.description or c.persona.identity}\n\n"
        f"Constitution `{c.meta.name}` v{c.meta.version} (content hash {c.content_hash()}), baked into "
        f"`{base}` by character-baker: the model is {c.persona.name} with no system prompt.",
        f"## Character\n\n{c.persona.identity}\n\nTraits:\n\n{traits}",
        "## How it was made\n\nDPO distillation (teacher with the constitution vs the student without), then "
        "introspection SFT on the distilled model, then an exact delta-space merge of the adapters "
        f"(weights {recipe.merge.weights}, mode {recipe.merge.mode}).\n\n```yaml\n{recipe_yaml}```",
        "## Training data\n\n" + (_table(sizes, ("data", "records")) if sizes else "No data files in this run."),
        "## Evaluation\n\n" + (_table(evaluation, ("measure", "value")) if evaluation else "Not evaluated yet."),
        "## Adapters\n\n" + ("\n".join(f"- `adapters/{name}/`: PEFT LoRA on `{base}`" for name in adapters)
                             or "None exported.")
        + "\n\n`introspect` was trained on top of the distilled model (base + `distill`); `persona` is the merge.",
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n"
        "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Who are you?\"}],\n"
        "                                    add_generation_prompt=True, return_tensors=\"pt\")\n"
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:]))\n```\n\n"
        "or `vllm serve PATH`.",
    ]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- export
def source_dtype(models: Any) -> str:
    """The dtype the base model's config declares ('float32' when it declares none)."""
    from transformers import AutoConfig

    from character_baker.backends.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(models.base, trust_remote_code=models.trust_remote_code),
                                        trust_remote_code=models.trust_remote_code)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared else "float32"


def merged_model(ctx: StageContext, dtype: str | None = None) -> tuple[Any, Any]:
    """(base model, loaded in `dtype` or the recipe's, with adapters/persona folded into its weights; tokenizer)."""
    from character_baker.backends.models import load_model
    from character_baker.stages.merging.delta import adapter_factors, fold_into, load_adapters

    folder = ctx.run.path("adapters", PERSONA_ADAPTER)
    if not is_adapter_folder(folder):
        raise UserError.single(str(folder), "adapters/persona", "this run has no merged persona adapter",
                               f"run `character-baker merge {ctx.run.root}` first")
    models = ctx.recipe.models.model_copy(update={"dtype": dtype}) if dtype else ctx.recipe.models
    model, tokenizer = load_model(models.base, models)
    peft_model = load_adapters(model, {PERSONA_ADAPTER: folder})
    delta = adapter_factors(peft_model, PERSONA_ADAPTER)
    base = peft_model.unload()
    fold_into(base, delta)
    return base, tokenizer


def export_run(ctx: StageContext, out: Path, *, dtype: str = "source", max_shard_size: str = "5GB",
               overwrite: bool = False) -> dict[str, Any]:
    """Write the merged model, tokenizer, model card and adapters to `out` atomically; return what was written."""
    from character_baker.backends.catalogue import atomic_folder

    if dtype not in DTYPES:
        raise UserError.single("--dtype", "dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError.single(str(out), "--out", "the export folder exists and is not empty",
                               "choose another --out, or pass --force to replace it")
    target = source_dtype(ctx.recipe.models) if dtype == "source" else dtype
    model, tokenizer = merged_model(ctx, target)  # folded in float32 arithmetic, rounded once to `target`
    adapters = run_adapters(ctx.run)
    with atomic_folder(out) as staging:
        write_hf_files(model, tokenizer, staging, model_card(ctx, adapters), max_shard_size)
        for name in adapters:
            copy_adapter(ctx.run.path("adapters", name), staging / "adapters" / name, ctx.recipe.models.base)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    return {"out": str(out), "dtype": target, "shards": len(shards), "adapters": adapters}
