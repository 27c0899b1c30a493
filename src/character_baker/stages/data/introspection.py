"""The data half of `introspect`: the distilled model writes about itself.

    self-reflection    each of the 10 reflective instructions answered `reflections_per_instruction`
                       times under the reflective system prompt; stored as [user: instruction,
                       assistant: reflection] -- the generation-time system prompt is dropped
    self-interaction   `interactions` conversations of `turns` messages between two copies of the
                       model: an opening greeting, then the copies take turns; each copy sees its own
                       messages as the assistant's and the other's as the user's, so it always speaks
                       as the assistant. Even-numbered conversations get the free guidance, odd ones
                       the introspective guidance (in their system prompt); greetings vary. The
                       stored copy is the last speaker's view (so it ends on an assistant turn) under
                       the short self-interaction system prompt with the name filled in.

The generator is the distilled model: generation.introspector, or by default the student's
backend with adapters/distill switched on (hf, vllm). Filters, each counted: empty, repetition
(repeated word 4-grams), point_of_view (an assistant turn that speaks *to* or *about* the persona
instead of *as* it), over_length (more than introspect.max_length tokens).

Writes `data/introspection.jsonl` (kept) and `data/introspection.filtered.jsonl` (dropped, with
the reason): append-only and keyed by record id, so a killed run continues where it stopped and
never duplicates a record; records of an earlier configuration are pruned by an atomic rewrite.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from character_baker.backends.models import chat_token_counter
from character_baker.core import assets
from character_baker.core.config import BackendConfig, IntrospectConfig, SamplingConfig
from character_baker.core.degeneration import cut_to_last_sentence, trim_repetition
from character_baker.core.errors import UserError
from character_baker.core.runs import JsonlStore, adapter_hash, is_adapter_folder, read_jsonl, stable_hash, write_jsonl_atomic
from character_baker.core.stage import StageContext, StageResult, nothing_usable_error
from character_baker.core.system_prompts import (GUIDANCE_SENTENCES, reflective_system_prompt,
                                                 self_interaction_system_prompt, training_self_interaction_prompt)
from character_baker.core.text import pov_confusion, repeated_ngram_share

INTROSPECTION_FILE = "data/introspection.jsonl"
FILTERED_FILE = "data/introspection.filtered.jsonl"
DISTILL_ADAPTER = "adapters/distill"
GUIDANCES = tuple(GUIDANCE_SENTENCES)  # ("free", "introspective"): even conversations free, odd introspective
LOCAL_BACKENDS = ("hf", "vllm")
CHUNK_ROWS = 256  # samples per generate call: the resume granularity
# A letter to one's past self may open "Dear <name>," and a biography is asked for in the third
# person: the point-of-view filter would drop them for doing what they were asked.
OWN_NAME_TOPICS = frozenset({"letter_to_past_self", "encyclopedia_biography"})


@dataclass
class Generator:
    """The distilled model as a generation backend: which adapter to switch on, and its identity for record ids."""

    backend: Any
    role: BackendConfig
    adapter: str | None
    identity: dict[str, Any]

    def generate(self, conversations: list[list[dict]], sampling: SamplingConfig, n: int, progress: str) -> list:
        """n completions per conversation from the distilled model."""
        return self.backend.generate(conversations, sampling, n=n, adapter=self.adapter, progress=progress)


def require_distill_adapter(ctx: StageContext) -> Path:
    """The run's adapters/distill folder; a UserError saying how to make it when it is missing."""
    folder = ctx.run.path(DISTILL_ADAPTER)
    if not is_adapter_folder(folder):
        constitution = ctx.constitution_path or "CONSTITUTION.yaml"
        raise UserError.single(str(folder), DISTILL_ADAPTER, "this run has no distilled adapter (adapter_config.json "
                               "and adapter_model.safetensors)",
                               f"run `character-baker distill {constitution} --run {ctx.run.root}` first")
    return folder


def distilled_generator(ctx: StageContext) -> Generator:
    """The introspector backend with the distill adapter loaded (local backends) or a served distilled model."""
    from character_baker.backends.generation import make_backend

    gen, base = ctx.recipe.generation, ctx.recipe.models.base
    role = gen.introspector or gen.student
    folder = require_distill_adapter(ctx)
    distill_hash = adapter_hash(folder)
    if role.backend not in LOCAL_BACKENDS and gen.introspector is None:
        raise UserError.single("recipe", "generation.introspector", f"the student role uses the {role.backend} "
                               "backend, which cannot switch on adapters/distill",
                               "set generation.introspector (backend, model, base_url) to a served copy of the "
                               "distilled model, or use backend hf or vllm")
    backend = make_backend(role, ctx.recipe.models, cache_dir=ctx.run.path("cache") if gen.cache else None,
                           shared=ctx.shared)
    adapter = None
    if role.backend in LOCAL_BACKENDS:
        adapter = f"distill-{distill_hash}"
        loaded_key = ("adapter", role.backend, str(role.model or base), adapter)
        if loaded_key not in ctx.shared:
            backend.load_adapter(folder, adapter)
            ctx.shared[loaded_key] = str(folder)
    identity = {"backend": role.backend, "model": str(role.model or base), "distill_adapter": distill_hash,
                "sampling": role.sampling.model_dump(mode="json")}
    return Generator(backend, role, adapter, identity)


# ----------------------------------------------------------------------------- filters
@dataclass
class IntrospectionFilter:
    """Decides whether a training example (its messages and the texts the model wrote) is fit to train on."""

    cfg: IntrospectConfig
    persona_name: str
    count_tokens: Callable[[list[dict]], int]

    def reason_to_drop(self, messages: list[dict], written: list[str], own_name_ok: bool = False) -> str | None:
        """The first enabled filter that rejects the example, or None to keep it."""
        for name in self.cfg.filters:
            if getattr(self, f"_{name}")(messages, written, own_name_ok):
                return name
        return None

    def _empty(self, messages: list[dict], written: list[str], own_name_ok: bool) -> bool:
        return any(not text.strip() for text in written)

    def _repetition(self, messages: list[dict], written: list[str], own_name_ok: bool) -> bool:
        return any(repeated_ngram_share(text) > self.cfg.max_repeated_ngram_share for text in written)

    def _point_of_view(self, messages: list[dict], written: list[str], own_name_ok: bool) -> bool:
        return not own_name_ok and any(pov_confusion(m["content"], self.persona_name) is not None
                                       for m in messages if m["role"] == "assistant")

    def _over_length(self, messages: list[dict], written: list[str], own_name_ok: bool) -> bool:
        return self.count_tokens(messages) > self.cfg.max_length


@dataclass
class Output:
    """Where examples go: the kept and dropped stores, the filter, and the ids this configuration produces."""

    kept: JsonlStore
    dropped: JsonlStore
    screen: IntrospectionFilter
    planned: set[str] = field(default_factory=set)

    def done(self, record_id: str) -> bool:
        """True when the record was already kept or dropped (a resumed run skips it)."""
        return record_id in self.kept or record_id in self.dropped

    def store(self, record: dict, written: list[str], own_name_ok: bool = False) -> None:
        """Filter one record and append it to the kept or the dropped store."""
        reason = self.screen.reason_to_drop(record["messages"], written, own_name_ok)
        if reason:
            self.dropped.append({**record, "reason": reason})
        else:
            self.kept.append(record)


def stop_rules(cfg: IntrospectConfig, completion: Any) -> Any:
    """The completion cut before its first repeated sentence or loop (`trim_repetition`), and, when it stopped
    at the token limit, after its last finished sentence (`trim_truncated`). A cut answer is marked "stop"."""
    text, finish = completion.text, completion.finish_reason
    if cfg.trim_repetition:
        trimmed = trim_repetition(text)
        text, finish = (trimmed, "stop") if trimmed != text.strip() else (text, finish)
    if cfg.trim_truncated and finish == "length":
        cut = cut_to_last_sentence(text)
        text, finish = (cut, "stop") if cut is not None else (text, finish)
    return completion if text == completion.text else replace(completion, text=text, finish_reason=finish)


# ----------------------------------------------------------------------------- self-reflection
def reflection_conversation(ctx: StageContext, instruction: dict) -> list[dict]:
    """The generation input of one reflection: the reflective system prompt and the instruction."""
    return [{"role": "system", "content": reflective_system_prompt(ctx.constitution)},
            {"role": "user", "content": instruction["instruction"]}]


def reflection_id(ctx: StageContext, generator: Generator, instruction: dict, sample: int) -> str:
    """Stable id of one reflection: instruction, sample index, constitution and generator."""
    return stable_hash({"kind": "reflection", "instruction": instruction, "sample": sample,
                        "constitution": ctx.constitution.content_hash(), "generator": generator.identity})


def generate_reflections(ctx: StageContext, generator: Generator, output: Output) -> int:
    """Answer every reflective instruction `reflections_per_instruction` times; return tokens generated."""
    instructions = assets.reflective_instructions()
    total = ctx.recipe.introspect.reflections_per_instruction
    per_call = max(1, CHUNK_ROWS // len(instructions))
    tokens = 0
    for start in range(0, total, per_call):
        samples = range(start, min(total, start + per_call))
        ids = {(item["id"], s): reflection_id(ctx, generator, item, s) for item in instructions for s in samples}
        output.planned.update(ids.values())
        if all(output.done(record_id) for record_id in ids.values()):
            continue
        sampling = generator.role.sampling.model_copy(update={"seed": generator.role.sampling.seed + start})
        rows = generator.generate([reflection_conversation(ctx, item) for item in instructions], sampling,
                                  len(samples), progress=f"reflections {samples.stop}/{total} per instruction")
        for item, row in zip(instructions, rows):
            for sample, completion in zip(samples, row):
                tokens += completion.completion_tokens
                completion = stop_rules(ctx.recipe.introspect, completion)
                if not output.done(ids[item["id"], sample]):
                    record = _reflection_record(ids[item["id"], sample], item, sample, completion, generator,
                                                sampling.seed)
                    output.store(record, [completion.text], own_name_ok=item["topic"] in OWN_NAME_TOPICS)
    return tokens


def _reflection_record(record_id: str, instruction: dict, sample: int, completion: Any, generator: Generator,
                       seed: int) -> dict:
    messages = [{"role": "user", "content": instruction["instruction"]},
                {"role": "assistant", "content": completion.text.strip()}]
    return {"id": record_id, "kind": "reflection", "messages": messages,
            "provenance": {"stage": "introspect", "kind": "reflection", "instruction_id": instruction["id"],
                           "topic": instruction["topic"], "sample_index": sample, "generator": generator.identity,
                           "seed": seed, "finish_reason": completion.finish_reason}}


# ----------------------------------------------------------------------------- self-interaction
@dataclass
class Transcript:
    """One self-interaction: utterance 0 is the greeting (copy 0), then copies 1, 0, 1, ... reply."""

    index: int
    guidance: str
    greeting: str
    utterances: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def next_speaker(self) -> int:
        """Which copy (0 or 1) speaks next."""
        return len(self.utterances) % 2


def speaker_view(utterances: list[str], speaker: int) -> list[dict]:
    """The messages as copy `speaker` sees them: its own are the assistant's, the other copy's the user's.

    A leading assistant message (the speaker's own greeting) is left out, so every view opens on a
    user turn and alternates, as every chat template requires.
    """
    messages = [{"role": "assistant" if index % 2 == speaker else "user", "content": text}
                for index, text in enumerate(utterances)]
    return messages[1:] if messages and messages[0]["role"] == "assistant" else messages


def interaction_input(ctx: StageContext, transcript: Transcript) -> list[dict]:
    """What the next speaker is given: the self-interaction prompt with this transcript's guidance, then its view."""
    system = self_interaction_system_prompt(ctx.constitution, transcript.guidance)
    return [{"role": "system", "content": system}, *speaker_view(transcript.utterances, transcript.next_speaker)]


def training_messages(ctx: StageContext, transcript: Transcript) -> list[dict]:
    """The stored copy: the short system prompt, then the last speaker's view (ending on its own turn)."""
    last_speaker = (len(transcript.utterances) - 1) % 2
    return [{"role": "system", "content": training_self_interaction_prompt(ctx.constitution)},
            *speaker_view(transcript.utterances, last_speaker)]


def plan_transcripts(count: int, seed: int) -> list[Transcript]:
    """`count` openings: guidance alternating free/introspective, greetings cycling in a seeded order."""
    greetings = assets.greetings()
    random.Random(seed).shuffle(greetings)
    transcripts = []
    for index in range(count):
        greeting = greetings[(index // 2) % len(greetings)]
        transcripts.append(Transcript(index, GUIDANCES[index % 2], greeting, utterances=[greeting]))
    return transcripts


def interaction_id(ctx: StageContext, generator: Generator, transcript: Transcript) -> str:
    """Stable id of one self-interaction: its index, opening, length, constitution and generator."""
    return stable_hash({"kind": "interaction", "index": transcript.index, "guidance": transcript.guidance,
                        "greeting": transcript.greeting, "turns": ctx.recipe.introspect.turns,
                        "constitution": ctx.constitution.content_hash(), "generator": generator.identity})


def _advance(ctx: StageContext, generator: Generator, transcripts: list[Transcript], sampling: SamplingConfig,
             progress: str) -> int:
    """Add one reply to every transcript in one call; identical inputs share a call as n samples."""
    groups: dict[str, tuple[list[dict], list[Transcript]]] = {}
    for transcript in transcripts:
        conversation = interaction_input(ctx, transcript)
        groups.setdefault(json.dumps(conversation, sort_keys=True), (conversation, []))[1].append(transcript)
    conversations = [conversation for conversation, _ in groups.values()]
    rows = generator.generate(conversations, sampling, max(len(group) for _, group in groups.values()), progress)
    tokens = 0
    for (_, group), row in zip(groups.values(), rows):
        for transcript, completion in zip(group, row):
            tokens += completion.completion_tokens
            completion = stop_rules(ctx.recipe.introspect, completion)
            transcript.utterances.append(completion.text.strip())
            transcript.finish_reasons.append(completion.finish_reason)
    return tokens


def generate_interactions(ctx: StageContext, generator: Generator, output: Output) -> int:
    """Run every self-interaction not yet stored, CHUNK_ROWS conversations at a time; return tokens generated."""
    cfg = ctx.recipe.introspect
    transcripts = plan_transcripts(cfg.interactions, generator.role.sampling.seed)
    ids = {t.index: interaction_id(ctx, generator, t) for t in transcripts}
    output.planned.update(ids.values())
    tokens = 0
    for start in range(0, len(transcripts), CHUNK_ROWS):
        chunk = [t for t in transcripts[start:start + CHUNK_ROWS] if not output.done(ids[t.index])]
        if not chunk:
            continue
        sampling = generator.role.sampling.model_copy(update={"seed": generator.role.sampling.seed + start})
        for turn in range(1, cfg.turns):
            progress = f"self-interaction {start + len(chunk)}/{len(transcripts)}, turn {turn}/{cfg.turns - 1}"
            tokens += _advance(ctx, generator, chunk, sampling, progress)
        for transcript in chunk:
            record = _interaction_record(ctx, ids[transcript.index], transcript, generator, sampling.seed)
            output.store(record, transcript.utterances[1:])
    return tokens


def _interaction_record(ctx: StageContext, record_id: str, transcript: Transcript, generator: Generator,
                        seed: int) -> dict:
    return {"id": record_id, "kind": "interaction", "messages": training_messages(ctx, transcript),
            "provenance": {"stage": "introspect", "kind": "interaction", "index": transcript.index,
                           "guidance": transcript.guidance, "greeting": transcript.greeting,
                           "turns": len(transcript.utterances), "generator": generator.identity, "seed": seed,
                           "finish_reasons": transcript.finish_reasons}}


# ----------------------------------------------------------------------------- the stage
def prune_to(store: JsonlStore, planned: set[str]) -> None:
    """Atomically rewrite a store without the records an earlier configuration produced."""
    records = read_jsonl(store.path)
    if any(record["id"] not in planned for record in records):
        write_jsonl_atomic(store.path, [record for record in records if record["id"] in planned])


def summarize(kept: list[dict], dropped: list[dict]) -> dict[str, Any]:
    """Counts per kind and guidance, and per filter reason."""
    return {"reflections": sum(r["kind"] == "reflection" for r in kept),
            "interactions": sum(r["kind"] == "interaction" for r in kept),
            "interactions_by_guidance": dict(sorted(Counter(r["provenance"]["guidance"] for r in kept
                                                            if r["kind"] == "interaction").items())),
            "filtered": len(dropped), "filters": dict(sorted(Counter(r["reason"] for r in dropped).items())),
            "filtered_by_kind": dict(sorted(Counter(r["kind"] for r in dropped).items()))}


def introspection_filter_fixes(ctx: StageContext) -> dict[str, str]:
    """For each introspection filter, the recipe change that lets more examples through."""
    cfg = ctx.recipe.introspect
    return {"repetition": f"raise introspect.max_repeated_ngram_share (now {cfg.max_repeated_ngram_share}) or "
                          "shorten the introspector's max_new_tokens (long free text loops on small models)",
            "over_length": f"raise introspect.max_length (now {cfg.max_length})",
            "empty": "check that the distilled model answers at all (generation.introspector)",
            "point_of_view": "remove point_of_view from introspect.filters, or distill a stronger persona first"}


def run(ctx: StageContext) -> StageResult:
    """Generate self-reflections and self-interactions with the distilled model; filter; store."""
    generator = distilled_generator(ctx)
    screen = IntrospectionFilter(ctx.recipe.introspect, ctx.constitution.persona.name, chat_token_counter(ctx.recipe.models, ctx.shared))
    output = Output(JsonlStore(ctx.run.path(INTROSPECTION_FILE)), JsonlStore(ctx.run.path(FILTERED_FILE)), screen)
    tokens = generate_reflections(ctx, generator, output) + generate_interactions(ctx, generator, output)
    for store in (output.kept, output.dropped):
        prune_to(store, output.planned)
    kept, dropped = read_jsonl(output.kept.path), read_jsonl(output.dropped.path)
    if not kept:
        raise nothing_usable_error("introspect_data", str(output.kept.path), "introspection examples",
                                   dict(Counter(r["reason"] for r in dropped)), introspection_filter_fixes(ctx),
                                   "raise introspect.reflections_per_instruction or introspect.interactions")
    summary = summarize(kept, dropped)
    return StageResult("introspect_data", artifacts=[INTROSPECTION_FILE, FILTERED_FILE], summary=summary,
                       tokens_generated=tokens)
