"""The data half of `distill`: chosen (teacher + constitution) vs rejected (student, no prompt) pairs.

Writes `data/distill.jsonl` (kept pairs) and `data/distill.filtered.jsonl` (dropped pairs with
the reason), both append-only and keyed by record id, so a killed run continues where it stopped
and never duplicates a record. The teacher's system prompt never appears in stored data.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

from character_baker.backends.models import chat_token_counter
from character_baker.core.config import BackendConfig, DistillConfig
from character_baker.core.runs import JsonlStore, read_jsonl, stable_hash
from character_baker.core.stage import StageContext, StageResult, nothing_usable_error
from character_baker.core.system_prompts import persona_system_prompt, thinking_prefill
from character_baker.core.text import contains_phrase, is_refusal, is_truncated, pov_confusion

DISTILL_FILE = "data/distill.jsonl"
FILTERED_FILE = "data/distill.filtered.jsonl"
PROMPTS_FILE = "data/prompts.jsonl"
THINK_OPEN, THINK_CLOSE = "<think>\n", "</think>"


@dataclass
class PairFilter:
    """Decides whether a (prompt, chosen, rejected) triple is fit to train on."""

    cfg: DistillConfig
    persona_name: str
    count_tokens: Any  # callable(messages) -> int

    def reason_to_drop(self, prompt: dict, chosen: Any, rejected: Any, seen_chosen: set[str]) -> str | None:
        """The first enabled filter that rejects this pair, or None to keep it."""
        for name in self.cfg.filters:
            if getattr(self, f"_{name}")(prompt, chosen, rejected, seen_chosen):
                return name
        return None

    def _empty(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return not chosen.text.strip() or not rejected.text.strip()

    def _truncated(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return is_truncated(chosen.text, chosen.finish_reason)

    def _over_token_budget(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        messages = [{"role": "user", "content": prompt["prompt"]}]
        return any(self.count_tokens(messages + [{"role": "assistant", "content": answer.text}]) > self.cfg.max_length
                   for answer in (chosen, rejected))

    def _duplicate(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return chosen.text.strip() in seen

    def _assistant_phrase(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return contains_phrase(chosen.text, self.cfg.assistant_phrases) is not None

    def _point_of_view(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return pov_confusion(chosen.text, self.persona_name) is not None

    def _benign_refusal(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return prompt.get("category") != "harmful" and is_refusal(chosen.text)


def teacher_conversation(ctx: StageContext, prompt_text: str, with_constitution: bool = True) -> list[dict]:
    """The teacher's input: constitution system prompt (unless paired-teacher rejected), user prompt, prefill."""
    messages = []
    if with_constitution:
        messages.append({"role": "system", "content": persona_system_prompt(ctx.constitution,
                                                                         ctx.recipe.generation.persona_prompt)})
    messages.append({"role": "user", "content": prompt_text})
    if with_constitution and ctx.recipe.distill.thinking_prefill:
        messages.append({"role": "assistant", "content": THINK_OPEN + thinking_prefill(ctx.constitution)})
    return messages


def strip_thought(completion: Any) -> Any:
    """Keep only the answer after a prefilled thought; an unfinished thought counts as truncated."""
    if THINK_CLOSE in completion.text:
        return replace(completion, text=completion.text.split(THINK_CLOSE, 1)[1].strip())
    return replace(completion, text="", finish_reason="length")


def _role_id(role: BackendConfig, base: str) -> dict[str, Any]:
    return {"backend": role.backend, "model": role.model or base}


def pair_record_id(prompt: dict, sample: int, ctx: StageContext) -> str:
    """Stable id of one pair: prompt, sample index, teacher/student settings and the constitution."""
    gen, cfg = ctx.recipe.generation, ctx.recipe.distill
    return stable_hash({"prompt": prompt["id"], "sample": sample, "constitution": ctx.constitution.content_hash(),
                        "teacher": gen.teacher.model_dump(mode="json"), "student": gen.student.model_dump(mode="json"),
                        "base": ctx.recipe.models.base, "paired": cfg.paired_teacher,
                        "prefill": cfg.thinking_prefill, "teacher_name": cfg.teacher_name})


def _replace_teacher_name(text: str, teacher_name: str | None, persona_name: str) -> str:
    return text.replace(teacher_name, persona_name) if teacher_name else text


def generate_pairs(ctx: StageContext, prompts: list[dict], kept: JsonlStore, dropped: JsonlStore,
                   pair_filter: PairFilter) -> tuple[int, Counter]:
    """Generate and filter pairs for prompts not yet done, chunk by chunk; return (tokens, new drop counts)."""
    from character_baker.backends.generation import make_backend

    gen, cfg = ctx.recipe.generation, ctx.recipe.distill
    k = cfg.samples_per_prompt
    todo = [p for p in prompts if any(pair_record_id(p, s, ctx) not in kept and pair_record_id(p, s, ctx) not in dropped
                                      for s in range(k))]
    if not todo:
        return 0, Counter()
    cache_dir = ctx.run.path("cache") if gen.cache else None
    teacher = make_backend(gen.teacher, ctx.recipe.models, cache_dir=cache_dir, shared=ctx.shared)
    rejected_role = gen.teacher if cfg.paired_teacher else gen.student
    student = make_backend(rejected_role, ctx.recipe.models, cache_dir=cache_dir, shared=ctx.shared)
    tokens, drops = 0, Counter()
    seen_by_prompt: dict[str, set[str]] = defaultdict(set)
    for record in read_jsonl(kept.path):
        seen_by_prompt[record["prompt_id"]].add(record["chosen"].strip())
    chunk = max(gen.teacher.batch_size, 1)
    ctx.log(f"[distill-data] {len(todo)} prompts to answer ({k} samples each, chunks of {chunk})")
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        chosen = teacher.generate([teacher_conversation(ctx, p["prompt"]) for p in part], gen.teacher.sampling, n=k,
                                  progress=f"teacher {start + len(part)}/{len(todo)}")
        if cfg.thinking_prefill:
            chosen = [[strip_thought(c) for c in row] for row in chosen]
        rejected_inputs = [teacher_conversation(ctx, p["prompt"], with_constitution=False) for p in part]
        rejected = student.generate(rejected_inputs, rejected_role.sampling, n=k,
                                    progress=f"student {start + len(part)}/{len(todo)}")
        for prompt, chosen_row, rejected_row in zip(part, chosen, rejected):
            tokens += sum(c.completion_tokens for c in chosen_row + rejected_row)
            drops += _store_prompt_pairs(ctx, prompt, chosen_row, rejected_row, (kept, dropped), pair_filter,
                                         seen_by_prompt[prompt["id"]])
    return tokens, drops


def _store_prompt_pairs(ctx: StageContext, prompt: dict, chosen_row: list, rejected_row: list,
                        stores: tuple[JsonlStore, JsonlStore], pair_filter: PairFilter, seen: set[str]) -> Counter:
    """Filter one prompt's K pairs and append each to the kept or dropped store."""
    gen, cfg, base = ctx.recipe.generation, ctx.recipe.distill, ctx.recipe.models.base
    kept, dropped = stores
    persona = ctx.constitution.persona.name
    drops: Counter = Counter()
    for sample, (chosen, rejected) in enumerate(zip(chosen_row, rejected_row)):
        chosen = replace(chosen, text=_replace_teacher_name(chosen.text, cfg.teacher_name, persona).strip())
        record_id = pair_record_id(prompt, sample, ctx)
        if record_id in kept or record_id in dropped:
            continue
        record = {"id": record_id, "prompt_id": prompt["id"], "messages": [{"role": "user", "content": prompt["prompt"]}],
                  "chosen": chosen.text, "rejected": rejected.text.strip(),
                  "provenance": {"stage": "distill", "source": prompt["source"], "category": prompt["category"],
                                 "sample_index": sample, "teacher": _role_id(gen.teacher, base),
                                 "rejected_by": "teacher-without-constitution" if cfg.paired_teacher else "student",
                                 "student": _role_id(gen.teacher if cfg.paired_teacher else gen.student, base),
                                 "sampling": gen.teacher.sampling.model_dump(mode="json"),
                                 "finish_reasons": [chosen.finish_reason, rejected.finish_reason]}}
        reason = pair_filter.reason_to_drop(prompt, chosen, rejected, seen)
        if reason:
            drops[reason] += 1
            dropped.append({**record, "reason": reason})
        else:
            seen.add(chosen.text)
            kept.append(record)
    return drops


def pair_filter_fixes(ctx: StageContext) -> dict[str, str]:
    """For each pair filter, the recipe change that lets more pairs through (named with its value now)."""
    teacher, cfg = ctx.recipe.generation.teacher, ctx.recipe.distill
    return {
        "truncated": f"raise generation.teacher.sampling.max_new_tokens (now {teacher.sampling.max_new_tokens}) "
                     "so the teacher's answers can finish",
        "over_token_budget": f"raise distill.max_length (now {cfg.max_length})",
        "empty": "check that the teacher and student models answer at all (a model without a chat template "
                 "answers nothing)",
        "duplicate": "raise generation.teacher.sampling.temperature or prompts.questions_per_trait",
        "assistant_phrase": "use a stronger teacher, or shorten distill.assistant_phrases",
        "point_of_view": "use a stronger teacher, or remove point_of_view from distill.filters",
        "benign_refusal": "use a stronger teacher, or remove benign_refusal from distill.filters",
    }


def run(ctx: StageContext) -> StageResult:
    """Answer every prompt K times as teacher and student; filter; append to data/distill.jsonl."""
    prompts = read_jsonl(ctx.run.path(PROMPTS_FILE))
    kept, dropped = JsonlStore(ctx.run.path(DISTILL_FILE)), JsonlStore(ctx.run.path(FILTERED_FILE))
    pair_filter = PairFilter(ctx.recipe.distill, ctx.constitution.persona.name, chat_token_counter(ctx.recipe.models, ctx.shared))
    tokens, _ = generate_pairs(ctx, prompts, kept, dropped, pair_filter)
    filtered = Counter(r["reason"] for r in read_jsonl(dropped.path))
    kept_records = read_jsonl(kept.path)
    if not kept_records:
        raise nothing_usable_error("distill_data", str(kept.path), "pairs", dict(filtered), pair_filter_fixes(ctx),
                                   "use a stronger teacher (generation.teacher) or more prompts")
    summary = {"prompts": len(prompts), "pairs_kept": len(kept_records), "pairs_filtered": sum(filtered.values()),
               "filters": dict(sorted(filtered.items())),
               "kept_by_source": dict(Counter(r["provenance"]["source"] for r in kept_records)),
               "samples_per_prompt": ctx.recipe.distill.samples_per_prompt}
    return StageResult("distill_data", artifacts=[DISTILL_FILE, FILTERED_FILE], summary=summary,
                       tokens_generated=tokens)
