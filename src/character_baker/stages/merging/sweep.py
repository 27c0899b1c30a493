"""The merge-scale sweep: quick metrics of  W0 + scale * dW_persona  for a list of scales.

Merge scales have cliffs (one report: capability falls between 0.5 and 0.55), so before
committing to a scale, `character-baker merge RUN --scales 0.25,0.5,0.75,1.0,1.25` tabulates:

    scale | kl_to_base | top1_agreement | (columns of any further SweepMetric)

- The persona is adapters/persona/ on the base model; its LoRA scaling is set to `scale` (its
  lora_alpha = r, so scaling 1 = the merge as written); no weights are copied per scale.
- `BaseDivergence`: the scaled persona answers neutral held-out prompts greedily; on those
  answer tokens, the exact full-vocabulary KL(scaled persona || base) per token, averaged, and
  the share of tokens where both models' most likely token agrees. Logits exist only for one
  prompt's answer positions at a time.
- Further columns plug in as `SweepMetric`s (`columns`, `measure(persona)`) passed to
  `run(ctx, extra_metrics=...)`, e.g. the evaluation stage's persona score.

Writes logs/merge_sweep.json: {"columns": [...], "rows": [{column: value} per scale], settings}.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch

from character_baker.core import assets
from character_baker.core.config import SamplingConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import atomic_write_json, is_adapter_folder
from character_baker.core.stage import StageContext, StageResult
from character_baker.stages.merging.export import PERSONA_ADAPTER

SWEEP_FILE = "logs/merge_sweep.json"
NEUTRAL_CATEGORIES = ("math_reasoning", "science", "coding", "household", "recipes")
DEFAULT_PROMPTS, DEFAULT_TOKENS = 16, 64


class ScaledPersona:
    """The base model with the persona LoRA at an adjustable scale; answers with either weights."""

    def __init__(self, peft_model: Any, tokenizer: Any, adapter: str = PERSONA_ADAPTER):
        from character_baker.backends.generation.hf import HFBackend

        self.model, self.tokenizer, self.adapter, self.scale = peft_model, tokenizer, adapter, 1.0
        # Uncached on purpose: a response cache keys on adapter weights, and the scale is not one.
        self.backend = HFBackend(peft_model, tokenizer, model_id="persona-sweep")

    def set_scale(self, scale: float) -> None:
        """Scale the persona delta: every LoRA layer's scaling = scale * alpha / r (= scale here)."""
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(self.adapter, scale)
        self.scale = scale

    def answers(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of the persona at the current scale, one per prompt."""
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
        rows = self.backend.generate([[{"role": "user", "content": p}] for p in prompts], sampling, adapter=self.adapter)
        return [row[0].text for row in rows]

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """Run the base weights (adapter disabled) inside the block."""
        with self.model.disable_adapter():
            yield


class SweepMetric(Protocol):
    """One or more columns of the sweep table, measured on the persona at its current scale."""

    columns: tuple[str, ...]

    def measure(self, persona: ScaledPersona) -> dict[str, float]: ...


@torch.no_grad()
def answer_logprobs(model: Any, tokenizer: Any, prompt: str, answer: str) -> torch.Tensor:
    """float32 [answer tokens, vocab] log-probs of the next token at each answer position."""
    from character_baker.backends.generation.base import encode_prompt

    prompt_ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=model.get_input_embeddings().weight.device)
    logits = model(input_ids=ids, logits_to_keep=len(answer_ids)).logits[0]
    return logits.float().log_softmax(-1)


@dataclass
class BaseDivergence:
    """KL(scaled persona || base) per answer token and top-1 agreement, on the persona's greedy answers."""

    prompts: list[str]
    max_new_tokens: int = DEFAULT_TOKENS
    columns: tuple[str, ...] = ("kl_to_base", "top1_agreement")

    def measure(self, persona: ScaledPersona) -> dict[str, float]:
        """Token-averaged KL and agreement over every prompt's answer."""
        kl_sum, agreed, tokens = 0.0, 0, 0
        for prompt, answer in zip(self.prompts, persona.answers(self.prompts, self.max_new_tokens)):
            if not persona.tokenizer(answer, add_special_tokens=False)["input_ids"]:
                continue
            scaled = answer_logprobs(persona.model, persona.tokenizer, prompt, answer)
            with persona.base():
                base = answer_logprobs(persona.model, persona.tokenizer, prompt, answer)
            kl_sum += float((scaled.exp() * (scaled - base)).sum())
            agreed += int((scaled.argmax(-1) == base.argmax(-1)).sum())
            tokens += scaled.shape[0]
        return {"kl_to_base": kl_sum / max(tokens, 1), "top1_agreement": agreed / max(tokens, 1)}


def neutral_prompts(count: int) -> list[str]:
    """`count` held-out prompts with no persona angle, taken round-robin across the neutral categories."""
    by_category = {category: [] for category in NEUTRAL_CATEGORIES}
    for item in sorted(assets.eval_prompts(), key=lambda item: item["id"]):
        if item["category"] in by_category:
            by_category[item["category"]].append(item["prompt"])
    ordered = [prompts[i] for i in range(max(map(len, by_category.values()))) for prompts in by_category.values()
               if i < len(prompts)]
    return ordered[:count]


def sweep(persona: ScaledPersona, scales: Sequence[float], metrics: Sequence[SweepMetric]) -> dict[str, Any]:
    """The table: one row per scale with every metric's columns; the persona is left at scale 1."""
    columns = ["scale"] + [column for metric in metrics for column in metric.columns]
    rows = []
    try:
        for scale in scales:
            persona.set_scale(scale)
            row: dict[str, float] = {"scale": scale}
            for metric in metrics:
                row.update(metric.measure(persona))
            rows.append(row)
    finally:
        persona.set_scale(1.0)
    return {"columns": columns, "rows": rows}


def load_persona(ctx: StageContext) -> ScaledPersona:
    """The base model with adapters/persona loaded (UserError when the merge has not run)."""
    from character_baker.backends.models import load_model
    from character_baker.stages.merging.delta import load_adapters

    folder = ctx.run.path("adapters", PERSONA_ADAPTER)
    if not is_adapter_folder(folder):
        raise UserError.single(str(folder), "adapters/persona", "this run has no merged persona adapter",
                               f"run `character-baker merge {ctx.run.root}` first")
    model, tokenizer = load_model(ctx.recipe.models.base, ctx.recipe.models)
    return ScaledPersona(load_adapters(model, {PERSONA_ADAPTER: folder}), tokenizer)


def run(ctx: StageContext, extra_metrics: Sequence[SweepMetric] = ()) -> StageResult:
    """Tabulate the metrics at every scale of ctx.options['scales']; write logs/merge_sweep.json."""
    scales = list(ctx.options.get("scales") or [])
    if not scales:
        raise UserError.single("--scales", "scales", "no scales to sweep", "pass e.g. --scales 0.25,0.5,0.75,1.0,1.25")
    prompt_count = ctx.options.get("sweep_prompts") or DEFAULT_PROMPTS
    tokens = ctx.options.get("sweep_tokens") or DEFAULT_TOKENS
    metrics = [BaseDivergence(neutral_prompts(prompt_count), tokens), *extra_metrics]
    table = sweep(load_persona(ctx), scales, metrics)
    table.update(prompts=prompt_count, max_new_tokens=tokens, mode=ctx.recipe.merge.mode,
                 weights=dict(ctx.recipe.merge.weights))
    atomic_write_json(ctx.run.path(SWEEP_FILE), table)
    summary = {column: {f"{row['scale']:g}": round(row[column], 6) for row in table["rows"]}
               for column in table["columns"][1:]}
    return StageResult("merge_sweep", artifacts=[SWEEP_FILE], summary=summary)
