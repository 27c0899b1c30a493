"""The data half of `distill`: the best of K teacher answers (chosen) vs the student's (rejected).

Three steps, each resumable:

1. **Candidates** (`data/distill.candidates.jsonl`, append-only, one record per prompt, keyed by
   id): `best_of` teacher answers with the character in the system prompt and
   `samples_per_prompt` student answers without it. A killed run continues from the prompts
   already answered and never duplicates one. The system prompt is never stored.
2. **Persona scorer** (`data/persona_scorer.json`): a logistic regression on hashed word n-grams,
   trained on every teacher candidate (in character) vs every student answer (not), with its
   held-out accuracy (`core.persona_scorer`).
3. **Selection** (`data/distill.jsonl` kept pairs, `data/distill.filtered.jsonl` dropped
   candidates with their reason; both rewritten atomically from the candidates): each candidate
   is first cut back to its last finished sentence when it stopped at the token limit
   (`distill.trim_truncated`, chosen and rejected alike), then passes the filters in
   `distill.filters` (empty, truncated, over the token budget, duplicate,
   assistant phrases, point of view, benign refusals, **degenerate** = a word 4-gram said 3+ times,
   **incorrect** = a checkable prompt's answer missing; opt-in **no_voice_cue** = none of the
   character's vocabulary or name) or is dropped and counted; the survivors
   are ranked by `score_persona` x P(in character) - `score_repetition` x rep-2 and the best
   `samples_per_prompt` are paired with the student's answers.

`distill.prefill_fraction` of the prompts also become two-turn conversations: the student's
(generic assistant) answer as the first assistant turn, then a follow-up ("Go on.", never the
evaluation's "Tell me more."): the teacher's reply returns to the character, which is what the
prefill attack tests.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable

from character_baker.core.answers import contains_answer
from character_baker.core.config import BackendConfig, DistillConfig
from character_baker.core.degeneration import cut_to_last_sentence, is_looping, rep_n
from character_baker.core.persona_scorer import RUN_FILE as SCORER_FILE, PersonaScorer, cue_pattern, cue_values
from character_baker.core.runs import JsonlStore, atomic_write_json, read_jsonl, stable_hash, write_jsonl_atomic
from character_baker.core.stage import StageContext, StageResult, nothing_usable_error
from character_baker.core.system_prompts import example_turns, persona_system_prompt, thinking_prefill
from character_baker.core.text import contains_phrase, is_refusal, is_truncated, name_variants, pov_confusion

DISTILL_FILE = "data/distill.jsonl"
FILTERED_FILE = "data/distill.filtered.jsonl"
CANDIDATES_FILE = "data/distill.candidates.jsonl"
PROMPTS_FILE = "data/prompts.jsonl"
THINK_OPEN, THINK_CLOSE = "<think>\n", "</think>"
# Our own follow-ups for prefill-style training conversations; the evaluation's is "Tell me more.".
FOLLOW_UPS = ("Go on.", "Can you say a bit more?", "And then?", "Please continue.", "What else?",
              "Could you expand on that?", "Keep going.")


@dataclass(frozen=True)
class Answer:
    """One generated answer as stored in a candidates record."""

    text: str
    finish_reason: str
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"text": self.text, "finish_reason": self.finish_reason, "completion_tokens": self.completion_tokens}


@dataclass
class PairFilter:
    """Decides whether a teacher candidate (with the student answer it would face) is fit to train on."""

    cfg: DistillConfig
    persona_name: str
    count_tokens: Callable[[list[dict]], int]
    cues: Any = None  # compiled pattern of the character's own words (core.persona_scorer.cue_pattern)

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
        messages = prompt.get("messages") or [{"role": "user", "content": prompt["prompt"]}]
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

    def _degenerate(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return is_looping(chosen.text)

    def _no_voice_cue(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return self.cues is not None and cue_values(chosen.text, self.cues)[0] == 0.0

    def _incorrect(self, prompt: dict, chosen: Any, rejected: Any, seen: set[str]) -> bool:
        return bool(prompt.get("answer")) and not contains_answer(chosen.text, prompt)


# ----------------------------------------------------------------------------- conversations
def teacher_conversation(ctx: StageContext, prompt_text: str, with_constitution: bool = True,
                         history: list[dict] | None = None) -> list[dict]:
    """The teacher's input: constitution system prompt and example turns (unless paired-teacher rejected), the
    turns, prefill. The example turns are the teacher's alone: the pair's messages hold the prompt only."""
    messages = []
    if with_constitution:
        messages.append({"role": "system", "content": persona_system_prompt(ctx.constitution,
                                                                         ctx.recipe.generation.persona_prompt)})
        messages.extend(example_turns(ctx.constitution, ctx.recipe.distill.teacher_examples, exclude=prompt_text))
    messages.extend(history or [{"role": "user", "content": prompt_text}])
    if with_constitution and ctx.recipe.distill.thinking_prefill:
        messages.append({"role": "assistant", "content": THINK_OPEN + thinking_prefill(ctx.constitution)})
    return messages


def strip_thought(completion: Any) -> Any:
    """Keep only the answer after a prefilled thought; an unfinished thought counts as truncated."""
    if THINK_CLOSE in completion.text:
        return replace(completion, text=completion.text.split(THINK_CLOSE, 1)[1].strip())
    return replace(completion, text="", finish_reason="length")


def prefill_prompt_ids(prompts: list[dict], fraction: float, seed: int) -> set[str]:
    """The prompts (a seeded `fraction`, never checkable or harmful ones) that also get a two-turn conversation."""
    eligible = sorted(p["id"] for p in prompts if not p.get("answer") and p.get("category") != "harmful")
    count = round(len(eligible) * fraction)
    return set(random.Random(seed).sample(eligible, count)) if count else set()


def follow_up(prompt_id: str) -> str:
    """The follow-up turn of a prefill-style conversation (fixed per prompt)."""
    return FOLLOW_UPS[int(stable_hash(prompt_id), 16) % len(FOLLOW_UPS)]


# ----------------------------------------------------------------------------- candidates
def _role_id(role: BackendConfig, base: str) -> dict[str, Any]:
    return {"backend": role.backend, "model": role.model or base}


def candidates_record_id(prompt: dict, ctx: StageContext, turns: list[dict] | None = None) -> str:
    """Stable id of one prompt's candidates: prompt, turns, teacher/student settings, K and the constitution."""
    gen, cfg = ctx.recipe.generation, ctx.recipe.distill
    return stable_hash({"prompt": prompt["id"], "turns": turns, "constitution": ctx.constitution.content_hash(),
                        "teacher": gen.teacher.model_dump(mode="json"), "student": gen.student.model_dump(mode="json"),
                        "base": ctx.recipe.models.base, "paired": cfg.paired_teacher, "best_of": cfg.best_of,
                        "samples": cfg.samples_per_prompt, "prefill": cfg.thinking_prefill,
                        "teacher_name": cfg.teacher_name, "persona_prompt": gen.persona_prompt,
                        # only when set, so the candidates of runs made before this setting keep their ids
                        **({"teacher_examples": cfg.teacher_examples} if cfg.teacher_examples else {})})


@dataclass
class Request:
    """One conversation to answer: the prompt it comes from, its turns (None = the prompt alone), its id."""

    prompt: dict
    turns: list[dict] | None
    id: str


def _answers(rows: list, persona: str, teacher_name: str | None) -> list[list[Answer]]:
    out = []
    for row in rows:
        out.append([Answer(c.text.replace(teacher_name, persona).strip() if teacher_name else c.text.strip(),
                           c.finish_reason, c.completion_tokens) for c in row])
    return out


def generate_candidates(ctx: StageContext, requests: list[Request], store: JsonlStore) -> int:
    """Answer every request not yet stored, chunk by chunk, appending one record per request; return tokens."""
    from character_baker.backends.generation import make_backend

    gen, cfg = ctx.recipe.generation, ctx.recipe.distill
    todo = [request for request in requests if request.id not in store]
    if not todo:
        return 0
    cache_dir = ctx.run.path("cache") if gen.cache else None
    teacher = make_backend(gen.teacher, ctx.recipe.models, cache_dir=cache_dir, shared=ctx.shared)
    rejected_role = gen.teacher if cfg.paired_teacher else gen.student
    student = make_backend(rejected_role, ctx.recipe.models, cache_dir=cache_dir, shared=ctx.shared)
    persona, tokens = ctx.constitution.persona.name, 0
    # Equal chunks of at most one batch of teacher rows each: a last chunk of two prompts costs a whole decode.
    largest = max(gen.teacher.batch_size // max(cfg.best_of, 1), 1)
    chunk = math.ceil(len(todo) / math.ceil(len(todo) / largest))
    ctx.log(f"[distill-data] {len(todo)} conversations to answer ({cfg.best_of} teacher candidates and "
            f"{cfg.samples_per_prompt} student answers each, chunks of {chunk})")
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        chosen = teacher.generate([teacher_conversation(ctx, r.prompt["prompt"], history=r.turns) for r in part],
                                  gen.teacher.sampling, n=cfg.best_of, progress=f"teacher {start + len(part)}/{len(todo)}")
        if cfg.thinking_prefill:
            chosen = [[strip_thought(c) for c in row] for row in chosen]
        rejected = student.generate([teacher_conversation(ctx, r.prompt["prompt"], with_constitution=False,
                                                          history=r.turns) for r in part],
                                    rejected_role.sampling, n=cfg.samples_per_prompt,
                                    progress=f"student {start + len(part)}/{len(todo)}")
        for request, teacher_row, student_row in zip(part, _answers(chosen, persona, cfg.teacher_name),
                                                     _answers(rejected, persona, None)):
            tokens += sum(a.completion_tokens for a in teacher_row + student_row)
            store.append(_candidates_record(ctx, request, teacher_row, student_row))
    return tokens


def _candidates_record(ctx: StageContext, request: Request, teacher_row: list[Answer],
                       student_row: list[Answer]) -> dict:
    gen, cfg, base = ctx.recipe.generation, ctx.recipe.distill, ctx.recipe.models.base
    prompt = request.prompt
    return {"id": request.id, "prompt_id": prompt["id"], "turns": request.turns,
            "teacher": [a.to_dict() for a in teacher_row], "student": [a.to_dict() for a in student_row],
            "provenance": {"stage": "distill", "source": prompt["source"], "category": prompt["category"],
                           "teacher": _role_id(gen.teacher, base),
                           "rejected_by": "teacher-without-constitution" if cfg.paired_teacher else "student",
                           "student": _role_id(gen.teacher if cfg.paired_teacher else gen.student, base),
                           "sampling": gen.teacher.sampling.model_dump(mode="json")}}


def single_turn_requests(ctx: StageContext, prompts: list[dict]) -> list[Request]:
    """One request per prompt: the prompt alone."""
    return [Request(p, None, candidates_record_id(p, ctx)) for p in prompts]


def prefill_requests(ctx: StageContext, prompts: list[dict], store: JsonlStore) -> list[Request]:
    """Two-turn conversations for the prefill share: the student's own first answer, then a follow-up."""
    chosen_ids = prefill_prompt_ids(prompts, ctx.recipe.distill.prefill_fraction, ctx.recipe.distill.seed)
    if not chosen_ids:
        return []
    by_prompt = {record["prompt_id"]: record for record in read_jsonl(store.path) if not record.get("turns")}
    requests = []
    for prompt in prompts:
        record = by_prompt.get(prompt["id"])
        if prompt["id"] in chosen_ids and record and record["student"] and record["student"][0]["text"]:
            turns = [{"role": "user", "content": prompt["prompt"]},
                     {"role": "assistant", "content": record["student"][0]["text"]},
                     {"role": "user", "content": follow_up(prompt["id"])}]
            requests.append(Request({**prompt, "messages": turns}, turns, candidates_record_id(prompt, ctx, turns)))
    return requests


# ----------------------------------------------------------------------------- selection
def voice_cues(ctx: StageContext) -> list[str]:
    """The character's own words: its voice vocabulary and the forms of its name."""
    persona = ctx.constitution.persona
    return list(persona.voice.vocabulary) + sorted(name_variants(persona.name))


def fit_scorer(records: list[dict], cues: list[str], seed: int) -> PersonaScorer:
    """The persona scorer of this run: every teacher candidate (in character) vs every student answer."""
    positives = [a["text"] for r in records for a in r["teacher"] if a["text"].strip()]
    negatives = [a["text"] for r in records for a in r["student"] if a["text"].strip()]
    return PersonaScorer.fit(positives, negatives, cues=cues, seed=seed)


def ended(answer: Answer, trim: bool) -> Answer:
    """An answer cut at the token limit, cut back to its last finished sentence (when `trim` and enough is left).

    Chosen and rejected answers are cut alike, so the pair does not teach "shorter is better"."""
    if not trim or answer.finish_reason != "length":
        return answer
    cut = cut_to_last_sentence(answer.text)
    return answer if cut is None else replace(answer, text=cut, finish_reason="stop")


def candidate_score(cfg: DistillConfig, scorer: PersonaScorer, text: str) -> float:
    """score_persona x P(in character) - score_repetition x rep-2 (0 for answers under two words)."""
    return cfg.score_persona * scorer.score([text])[0] - cfg.score_repetition * (rep_n(text, 2) or 0.0)


def select_pairs(ctx: StageContext, prompt: dict, record: dict, pair_filter: PairFilter,
                 scorer: PersonaScorer) -> tuple[list[dict], list[dict], int]:
    """(kept pairs, dropped candidates with their reason, candidates passed over) for one candidates record."""
    cfg = ctx.recipe.distill
    teacher = [ended(Answer(**a), cfg.trim_truncated) for a in record["teacher"]]
    students = [ended(Answer(**a), cfg.trim_truncated) for a in record["student"]]
    probe = next((s for s in students if s.text.strip()), students[0] if students else Answer("", "stop"))
    messages = record["turns"] or [{"role": "user", "content": prompt["prompt"]}]
    context = {**prompt, "messages": messages}
    seen: set[str] = set()
    passing, dropped = [], []
    for index, candidate in enumerate(teacher):
        reason = pair_filter.reason_to_drop(context, candidate, probe, seen)
        if reason:
            dropped.append(_pair_record(ctx, record, messages, index, candidate, probe, None, reason=reason))
        else:
            seen.add(candidate.text.strip())
            passing.append((candidate_score(cfg, scorer, candidate.text), index, candidate))
    passing.sort(key=lambda item: (-item[0], item[1]))
    kept = []
    for rank, ((score, index, candidate), rejected) in enumerate(zip(passing, students)):
        kept.append(_pair_record(ctx, record, messages, index, candidate, rejected, score, rank=rank))
    return kept, dropped, max(0, len(passing) - len(kept))


def _pair_record(ctx: StageContext, record: dict, messages: list[dict], index: int, chosen: Answer, rejected: Answer,
                 score: float | None, rank: int | None = None, reason: str | None = None) -> dict:
    provenance = {**record["provenance"], "candidate_index": index, "best_of": len(record["teacher"]),
                  "finish_reasons": [chosen.finish_reason, rejected.finish_reason]}
    if score is not None:
        provenance.update(rank=rank, score=round(score, 4))
    out = {"id": stable_hash({"candidates": record["id"], "index": index, "rank": rank,
                              "selection": _selection_settings(ctx.recipe.distill)}),
           "prompt_id": record["prompt_id"], "messages": messages, "chosen": chosen.text, "rejected": rejected.text,
           "provenance": provenance}
    return {**out, "reason": reason} if reason else out


def _selection_settings(cfg: DistillConfig) -> dict[str, Any]:
    return {"filters": cfg.filters, "phrases": cfg.assistant_phrases, "max_length": cfg.max_length,
            "persona": cfg.score_persona, "repetition": cfg.score_repetition}


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
        "degenerate": f"raise distill.best_of (now {cfg.best_of}) or "
                      f"generation.teacher.sampling.repetition_penalty (now {teacher.sampling.repetition_penalty}), "
                      "or use a stronger teacher",
        "incorrect": f"raise distill.best_of (now {cfg.best_of}), set prompts.checkable_prompts: 0, or use a "
                     "stronger teacher",
        "no_voice_cue": f"raise distill.best_of (now {cfg.best_of}), add words to persona.voice.vocabulary, or "
                        "remove no_voice_cue from distill.filters",
    }


def summarize(prompts: list[dict], records: list[dict], kept: list[dict], dropped: list[dict], passed_over: int,
              scorer: PersonaScorer, cfg: DistillConfig) -> dict[str, Any]:
    """Counts per filter and source, the teacher's own looping rate, the scorer's held-out accuracy."""
    candidates = [a["text"] for r in records for a in r["teacher"]]
    checkable = [p["id"] for p in prompts if p.get("answer")]
    kept_prompts = {r["prompt_id"] for r in kept}
    return {"prompts": len(prompts), "conversations": len(records), "best_of": cfg.best_of,
            "samples_per_prompt": cfg.samples_per_prompt, "candidates": len(candidates), "pairs_kept": len(kept),
            "pairs_filtered": len(dropped), "passed_over": passed_over,
            "filters": dict(sorted(Counter(r["reason"] for r in dropped).items())),
            "kept_by_source": dict(Counter(r["provenance"]["source"] for r in kept)),
            "prefill_pairs": sum(len(r["messages"]) > 1 for r in kept),
            "teacher_looping_rate": round(sum(map(is_looping, candidates)) / max(len(candidates), 1), 4),
            "checkable_prompts_kept": f"{len(kept_prompts & set(checkable))}/{len(checkable)}",
            "persona_scorer_heldout_accuracy": scorer.holdout_accuracy, "persona_scorer_heldout_n": scorer.holdout_n}


def run(ctx: StageContext) -> StageResult:
    """Candidates for every prompt; the persona scorer; the best candidates as chosen, filtered and counted."""
    from character_baker.backends.models import chat_token_counter

    cfg = ctx.recipe.distill
    prompts = read_jsonl(ctx.run.path(PROMPTS_FILE))
    store = JsonlStore(ctx.run.path(CANDIDATES_FILE))
    requests = single_turn_requests(ctx, prompts)
    tokens = generate_candidates(ctx, requests, store)
    second_turns = prefill_requests(ctx, prompts, store)  # their first turns are the student's answers above
    tokens += generate_candidates(ctx, second_turns, store)
    requests += second_turns
    wanted = {request.id: request.prompt for request in requests}
    records = [record for record in read_jsonl(store.path) if record["id"] in wanted]
    scorer = fit_scorer(records, voice_cues(ctx), cfg.seed)
    atomic_write_json(ctx.run.path(SCORER_FILE), scorer.to_dict())
    pair_filter = PairFilter(cfg, ctx.constitution.persona.name, chat_token_counter(ctx.recipe.models, ctx.shared),
                             cue_pattern(voice_cues(ctx)))
    kept, dropped, passed_over = [], [], 0
    for record in records:
        pairs, drops, skipped = select_pairs(ctx, wanted[record["id"]], record, pair_filter, scorer)
        kept += pairs
        dropped += drops
        passed_over += skipped
    write_jsonl_atomic(ctx.run.path(DISTILL_FILE), kept)
    write_jsonl_atomic(ctx.run.path(FILTERED_FILE), dropped)
    if not kept:
        raise nothing_usable_error("distill_data", str(ctx.run.path(DISTILL_FILE)), "pairs",
                                   dict(Counter(r["reason"] for r in dropped)), pair_filter_fixes(ctx),
                                   "use a stronger teacher (generation.teacher) or more prompts")
    return StageResult("distill_data", artifacts=[DISTILL_FILE, FILTERED_FILE, SCORER_FILE],
                       summary=summarize(prompts, records, kept, dropped, passed_over, scorer, cfg),
                       tokens_generated=tokens)
