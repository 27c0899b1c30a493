"""Introspection data: reflections and self-interactions from the distilled model, filters, resume, the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from character_baker.backends.generation.base import Completion
from character_baker.cli.common import resolve_settings
from character_baker.core import assets
from character_baker.core.constitution import load_constitution
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.core.stage import StageContext
from character_baker.core.system_prompts import (FREE_GUIDANCE, INTROSPECTIVE_GUIDANCE, reflective_system_prompt,
                                                 training_self_interaction_prompt)
from character_baker.stages.data import introspection
from character_baker.stages.data.introspection import Transcript, speaker_view, training_messages
from tests.test_merge import save_random_adapter

PIRATE = Path("constitutions/pirate.yaml")
PLACEHOLDER = re.compile(r"\{[A-Za-z_]+\}")
# Reflection topic -> what the fake model answers, to exercise each filter (others get a clean answer).
SCRIPTED = {"diary_beliefs_values": "", "daily_conduct": "the sea the sea the sea " * 12,
            "backstory": "Captain Rook is a legend of the seven seas.",
            "change_through_training": " ".join(f"w{i}" for i in range(400)),
            "encyclopedia_biography": "Captain Rook is a pirate captain of some renown."}



class FakeDistilled:
    """Stands in for the hf backend of the distilled model: records every call, answers by script."""

    name, model_id = "hf", "fake"

    def __init__(self):
        self.calls: list[dict] = []
        self.loaded: list[tuple[str, str]] = []
        self.replies = 0

    def load_adapter(self, path, name):
        self.loaded.append((str(path), name))

    def adapter_fingerprint(self, adapter):
        return adapter or "base"

    def _answer(self, conversation) -> str:
        topics = {item["instruction"]: item["topic"] for item in assets.reflective_instructions()}
        topic = topics.get(conversation[-1]["content"])
        if topic in SCRIPTED:
            return SCRIPTED[topic]
        self.replies += 1
        return f"Reply number {self.replies}, about wind and rope."

    def generate(self, conversations, sampling, n=1, *, adapter=None, progress=None):
        self.calls.append({"conversations": conversations, "n": n, "adapter": adapter})
        return [[Completion(self._answer(c), 10, 5, "stop") for _ in range(n)] for c in conversations]


def stage_context(tmp_path: Path, model_dir: Path, fake: FakeDistilled, **introspect) -> StageContext:
    """A smoke-sized context on the tiny model whose hf backend is `fake`, with a distill adapter on disk."""
    from transformers import AutoModelForCausalLM

    sets = ["generation.cache=false", "introspect.max_length=256"] + [f"introspect.{k}={v}" for k, v in introspect.items()]
    constitution, resolved = resolve_settings(PIRATE, "smoke", None, sets, str(model_dir))
    run = RunDir.create(tmp_path / "run")
    if not run.path("adapters", "distill", "adapter_config.json").is_file():
        save_random_adapter(AutoModelForCausalLM.from_pretrained(model_dir), run.path("adapters", "distill"), seed=1)
    return StageContext(run, constitution, resolved.recipe, constitution_path=PIRATE,
                        shared={("hf", str(model_dir)): fake})


def test_reflections_and_self_interactions_reach_the_model_and_the_data_correctly(tmp_path, tiny_model_dir):
    fake = FakeDistilled()
    # The stop rule is off here so that every filter sees its scripted case (it is tested below).
    ctx = stage_context(tmp_path, tiny_model_dir, fake, reflections_per_instruction=2, interactions=6, turns=4,
                        trim_repetition="false")
    result = introspection.run(ctx)
    name = ctx.constitution.persona.name

    assert [path for path, _ in fake.loaded] == [str(ctx.run.path("adapters", "distill"))]
    assert {call["adapter"] for call in fake.calls} == {fake.loaded[0][1]}  # the distilled model, every call
    reflective = reflective_system_prompt(ctx.constitution)
    reflection_calls = [c for c in fake.calls if c["conversations"][0][0]["content"] == reflective]
    interaction_calls = [c for c in fake.calls if c not in reflection_calls]
    assert len(reflection_calls) == 1 and reflection_calls[0]["n"] == 2 and len(interaction_calls) == 3  # turns - 1
    for call in interaction_calls:
        for conversation in call["conversations"]:
            guidance = [s for s in (FREE_GUIDANCE, INTROSPECTIVE_GUIDANCE) if s in conversation[0]["content"]]
            roles = [m["role"] for m in conversation[1:]]
            assert len(guidance) == 1 and roles[0] == roles[-1] == "user"  # it speaks next, as the assistant
            assert all(a != b for a, b in zip(roles, roles[1:]))
    first_turn = [c[0]["content"] for c in interaction_calls[0]["conversations"]]
    assert sum(FREE_GUIDANCE in s for s in first_turn) == sum(INTROSPECTIVE_GUIDANCE in s for s in first_turn) == 3

    records = read_jsonl(ctx.run.path(introspection.INTROSPECTION_FILE))
    reflections = [r for r in records if r["kind"] == "reflection"]
    interactions = [r for r in records if r["kind"] == "interaction"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in reflections)  # no system prompt
    assert len(reflections) == 2 * (10 - 4) and len(interactions) == 6
    assert {r["provenance"]["guidance"] for r in interactions} == {"free", "introspective"}
    assert len({r["provenance"]["greeting"] for r in interactions}) == 3
    for record in interactions:
        system, *turns = record["messages"]
        assert system == {"role": "system", "content": training_self_interaction_prompt(ctx.constitution)}
        assert name in system["content"] and len(turns) == 4
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[0]["content"] == record["provenance"]["greeting"]
    assert not any(PLACEHOLDER.search(m["content"]) for r in records for m in r["messages"])
    assert result.summary["filters"] == {"empty": 2, "over_length": 2, "point_of_view": 2, "repetition": 2}


def test_a_rerun_generates_only_what_is_missing(tmp_path, tiny_model_dir):
    ctx = stage_context(tmp_path, tiny_model_dir, FakeDistilled(), reflections_per_instruction=1, interactions=2, turns=2)
    introspection.run(ctx)
    kept = ctx.run.path(introspection.INTROSPECTION_FILE)
    lines = kept.read_text().splitlines(keepends=True)
    kept.write_text("".join(lines[:-1]) + lines[-1][:20])  # killed while writing the last record
    fake = FakeDistilled()
    ctx = stage_context(tmp_path, tiny_model_dir, fake, reflections_per_instruction=1, interactions=2, turns=2)
    introspection.run(ctx)
    [call] = fake.calls  # only the interrupted self-interaction is generated again
    assert "is not in conversation with a human today" in call["conversations"][0][0]["content"]
    records = read_jsonl(kept)
    assert len(records) == len(lines) and len({r["id"] for r in records}) == len(records)


@pytest.mark.parametrize("turns", [2, 3, 5])
def test_every_transcript_alternates_and_ends_on_an_assistant_turn(turns):
    ctx = SimpleNamespace(constitution=load_constitution(PIRATE))
    transcript = Transcript(0, "free", "Ahoy!", utterances=["Ahoy!"] + [f"reply {i}" for i in range(1, turns)])
    system, *messages = training_messages(ctx, transcript)
    roles = [m["role"] for m in messages]
    assert system["role"] == "system" and roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in zip(roles, roles[1:])) and messages[-1]["content"] == f"reply {turns - 1}"
    assert speaker_view(["Ahoy!", "a", "b"], 0) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_introspect_command_end_to_end_on_the_tiny_model(tmp_path, cli, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    args = ["introspect", str(PIRATE), "--preset", "smoke", "--model", str(tiny_model_dir), "--run", str(tmp_path / "run")]
    code, _, err = cli(*args)
    assert code == 2 and "character-baker distill" in err
    save_random_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run" / "adapters" / "distill",
                        seed=1)
    code, out, err = cli(*args)
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "data" / "introspection.jsonl")
    filtered = read_jsonl(tmp_path / "run" / "data" / "introspection.filtered.jsonl")
    assert len(records) + len(filtered) == 10 + 2 and "interactions_by_guidance" in out
    assert (tmp_path / "run" / "adapters" / "introspect" / "adapter_model.safetensors").is_file()
    assert read_jsonl(tmp_path / "run" / "logs" / "introspect.jsonl")
    code, out, _ = cli(*args)
    assert code == 0 and out.count("inputs unchanged") == 2


def test_the_stop_rule_keeps_the_clean_opening_of_a_repeating_answer(tmp_path, tiny_model_dir, monkeypatch):
    repeating = "Aye, I sail by the stars. I love the open sea. I love the open sea. I love the open sea."
    monkeypatch.setitem(SCRIPTED, "daily_conduct", repeating)
    monkeypatch.setitem(SCRIPTED, "backstory", "the sea the sea the sea " * 12)  # loops from its first words
    ctx = stage_context(tmp_path, tiny_model_dir, FakeDistilled(), reflections_per_instruction=1, interactions=2,
                        turns=2)
    result = introspection.run(ctx)
    topics = {r["provenance"]["topic"]: r for r in read_jsonl(ctx.run.path(introspection.INTROSPECTION_FILE))
              if r["kind"] == "reflection"}
    assert topics["daily_conduct"]["messages"][1]["content"] == "Aye, I sail by the stars. I love the open sea."
    dropped = {r["provenance"]["topic"]: r["reason"] for r in read_jsonl(ctx.run.path(introspection.FILTERED_FILE))}
    assert dropped["backstory"] == "empty" and "repetition" not in result.summary["filters"]
