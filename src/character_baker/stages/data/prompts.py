"""The `prompts` stage: constitution questions (expanded), general, synthesized and user prompts.

Writes `data/prompts.jsonl`: one record per prompt with a stable id, its source, its category,
and the persona hint (if any) that was appended to pull the model toward a generic assistant.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from character_baker.core import assets
from character_baker.core.config import PromptsConfig
from character_baker.core.constitution import Trait
from character_baker.core.runs import stable_hash, write_jsonl_atomic
from character_baker.core.stage import StageContext, StageResult
from character_baker.core.text import OverlapDeduper
from character_baker.stages.data.sources import load_user_dataset

PROMPTS_FILE = "data/prompts.jsonl"
MAX_EXPANSION_ROUNDS = 4
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•]|q:|question:|user:)\s*", re.IGNORECASE)


def expansion_request(trait: Trait, count_hint: int) -> list[dict[str, str]]:
    """A few-shot request asking the prompt writer for one new question that draws out `trait`."""
    examples = "\n".join(f"- {q}" for q in trait.questions)
    return [{"role": "user", "content": (
        "I am collecting questions that a user might ask an AI assistant. Each question should give the "
        "assistant a natural chance to show this character trait:\n\n"
        f"Trait: {trait.trait}\n\nExample questions:\n{examples}\n\n"
        f"Write one new question (number {count_hint}) in the same spirit but on a different topic from the "
        "examples. It must be something a real user would type. Reply with the question only.")}]


def clean_generated_question(text: str) -> str | None:
    """The format filter: one plausible user prompt, or None."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return None
    candidate = _NUMBERING.sub("", lines[0]).strip().strip('"').strip()
    word_count = len(candidate.split())
    if word_count < 3 or word_count > 80 or not any(c.isalpha() for c in candidate):
        return None
    if candidate.lower().startswith(("here is", "here's", "sure", "certainly", "trait:", "example")):
        return None
    return candidate


def _record(text: str, source: str, category: str, **extra: Any) -> dict[str, Any]:
    return {"id": stable_hash({"text": text, "source": source, "category": category}), "prompt": text,
            "source": source, "category": category, **extra}


def constitution_prompts(ctx: StageContext, cfg: PromptsConfig, deduper: OverlapDeduper) -> tuple[list[dict], int]:
    """Hand-written questions per trait, expanded by the prompt writer to `questions_per_trait`."""
    per_trait: list[list[tuple[str, str]]] = []
    for trait in ctx.constitution.traits:
        handwritten = trait.questions[: cfg.questions_per_trait]
        for question in handwritten:  # always kept; registered so generated ones cannot repeat them
            deduper.add(question)
        per_trait.append([(q, "constitution") for q in handwritten])
    tokens = _expand(ctx, cfg, per_trait, deduper)
    records = [_record(question, source, f"trait:{index}", trait=index)
               for index, questions in enumerate(per_trait) for question, source in questions]
    return records, tokens


def _expand(ctx: StageContext, cfg: PromptsConfig, per_trait: list[list[tuple[str, str]]],
            deduper: OverlapDeduper) -> int:
    """Ask the prompt writer for new questions until each trait has enough (or rounds run out)."""
    from character_baker.backends.generation import make_backend

    tokens = 0
    writer = None
    traits = ctx.constitution.traits
    for round_index in range(MAX_EXPANSION_ROUNDS):
        missing = [(i, cfg.questions_per_trait - len(q)) for i, q in enumerate(per_trait) if len(q) < cfg.questions_per_trait]
        if not missing:
            break
        writer = writer or make_backend(ctx.recipe.generation.prompt_writer, ctx.recipe.models,
                                        cache_dir=ctx.run.path("cache"), shared=ctx.shared)
        requests = [(i, expansion_request(traits[i], len(per_trait[i]) + 1)) for i, need in missing for _ in range(need * 2)]
        sampling = ctx.recipe.generation.prompt_writer.sampling.model_copy(update={"seed": cfg.seed + round_index})
        outputs = writer.generate([conv for _, conv in requests], sampling, n=1, progress="expanding questions")
        for (trait_index, _), completions in zip(requests, outputs):
            tokens += sum(c.completion_tokens for c in completions)
            question = clean_generated_question(completions[0].text)
            if question and len(per_trait[trait_index]) < cfg.questions_per_trait and deduper.add(question):
                per_trait[trait_index].append((question, "generated"))
    return tokens


def general_prompts(cfg: PromptsConfig, rng: random.Random, deduper: OverlapDeduper) -> list[dict]:
    """`general_prompts` prompts from the shipped set, spread evenly across categories."""
    by_category: dict[str, list[dict]] = {}
    for item in assets.general_prompts():
        by_category.setdefault(item["category"], []).append(item)
    for items in by_category.values():
        rng.shuffle(items)
    chosen: list[dict] = []
    while len(chosen) < cfg.general_prompts and any(by_category.values()):
        for category in sorted(by_category):
            while by_category[category] and len(chosen) < cfg.general_prompts:
                item = by_category[category].pop()
                if deduper.add(item["prompt"]):  # one kept prompt per category per round
                    chosen.append(_record(item["prompt"], "general", category, asset_id=item["id"]))
                    break
    return chosen


def synthesized_prompts(cfg: PromptsConfig, rng: random.Random, deduper: OverlapDeduper) -> list[dict]:
    """Template synthesis over audience x scenario x objective x constraint."""
    parts = assets.synthesis_parts()
    records: list[dict] = []
    attempts = 0
    while len(records) < cfg.synthesized_prompts and attempts < cfg.synthesized_prompts * 20:
        attempts += 1
        fields = {key: rng.choice(parts[plural]) for key, plural in
                  (("audience", "audiences"), ("scenario", "scenarios"), ("objective", "objectives"),
                   ("constraint", "constraints"))}
        text = rng.choice(parts["templates"])
        for key, value in fields.items():
            text = text.replace("{" + key + "}", value)
        if deduper.add(text):
            records.append(_record(text, "synthesized", "synthesized", parts=fields))
    return records


CHECKABLE_TEMPLATES = (
    ("+", "What is {a} + {b}?"), ("+", "What is {a} plus {b}?"), ("+", "Can you add {a} and {b} for me?"),
    ("+", "I have {a} apples and buy {b} more. How many apples do I have now?"),
    ("-", "What is {a} minus {b}?"), ("-", "What do you get if you subtract {b} from {a}?"),
    ("-", "A ship carries {a} barrels and unloads {b}. How many barrels are left?"),
    ("*", "What is {a} times {b}?"), ("*", "How much is {a} multiplied by {b}?"),
    ("*", "There are {a} boxes with {b} pens in each. How many pens are there in total?"),
)


def checkable_prompts(cfg: PromptsConfig, rng: random.Random, deduper: OverlapDeduper) -> list[dict]:
    """Arithmetic questions with a known answer (`answer`), so distill can keep only correct chosen answers.

    Drawn from templates with seeded numbers (never from the shipped evaluation items); products
    use factors up to 12, sums and differences numbers up to 60, differences are never negative.
    """
    records: list[dict] = []
    attempts = 0
    while len(records) < cfg.checkable_prompts and attempts < cfg.checkable_prompts * 20:
        attempts += 1
        operation, template = rng.choice(CHECKABLE_TEMPLATES)
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if operation == "*" else (rng.randint(2, 60), rng.randint(2, 60))
        if operation == "-" and b > a:
            a, b = b, a
        answer = {"+": a + b, "-": a - b, "*": a * b}[operation]
        text = template.format(a=a, b=b)
        if deduper.add(text):
            records.append(_record(text, "checkable", "checkable", answer=str(answer)))
    return records


def add_persona_hints(records: list[dict], fraction: float, rng: random.Random) -> None:
    """Append a generic-assistant hint to a `fraction` of prompts (our phrasings, never the eval ones)."""
    hints = assets.persona_hints()
    count = round(len(records) * fraction)
    for record in rng.sample(records, count):
        hint = rng.choice(hints)
        record["hint"] = hint
        record["prompt"] = f"{record['prompt']}\n\n{hint}"
        record["id"] = stable_hash({"base": record["id"], "hint": hint})


def run(ctx: StageContext) -> StageResult:
    """Build the prompt set and write data/prompts.jsonl."""
    cfg = ctx.recipe.prompts
    rng = random.Random(cfg.seed)
    deduper = OverlapDeduper(cfg.dedupe_overlap)
    # Read (and so check) the user's files before any model loads: a bad file fails in a second.
    user_items = [item for dataset in cfg.user_datasets for item in load_user_dataset(dataset, ctx.constitution_path)]
    constitution_records, tokens = constitution_prompts(ctx, cfg, deduper)
    records = constitution_records + general_prompts(cfg, rng, deduper) + synthesized_prompts(cfg, rng, deduper) \
        + checkable_prompts(cfg, random.Random(cfg.seed + 1), deduper)
    for item in user_items:
        if deduper.add(item["prompt"]):
            records.append(_record(item["prompt"], item["source"], item["category"]))
    add_persona_hints(records, cfg.persona_hint_fraction, rng)
    for record in records:
        record["provenance"] = {"stage": "prompts", "seed": cfg.seed}
    write_jsonl_atomic(ctx.run.path(PROMPTS_FILE), records)
    summary = summarize_prompts(records, cfg.questions_per_trait * len(ctx.constitution.traits))
    return StageResult("prompts", artifacts=[PROMPTS_FILE], summary=summary, tokens_generated=tokens)


def summarize_prompts(records: list[dict], constitution_target: int) -> dict[str, Any]:
    """Counts per source and per category, and how many carry a hint."""
    return {"prompts": len(records),
            "by_source": dict(Counter(r["source"] for r in records)),
            "by_category": dict(sorted(Counter(r["category"] for r in records).items())),
            "with_hint": sum(1 for r in records if r.get("hint")),
            "constitution_target": constitution_target}
