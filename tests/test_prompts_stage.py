"""The prompts stage: sources, categories, hints, determinism, user datasets."""

import json
from collections import Counter

import pytest

from character_baker.core import assets
from character_baker.core.config import PromptsConfig, UserDataset
from character_baker.core.constitution import load_constitution
from character_baker.core.recipes import parse_set_overrides, resolve_recipe
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.core.stage import StageContext
from character_baker.core.text import word_overlap
from character_baker.stages.data import prompts as prompts_stage
from character_baker.stages.data.sources import load_user_dataset

PIRATE = "constitutions/pirate.yaml"


def make_ctx(tmp_path, model_dir, *sets):
    recipe = resolve_recipe([parse_set_overrides([f"models.base={model_dir}", *sets])], "smoke").recipe
    return StageContext(run=RunDir.create(tmp_path / "run"), constitution=load_constitution(PIRATE), recipe=recipe,
                        constitution_path=None)


def test_prompt_set_has_every_source_and_stable_ids(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path, tiny_model_dir, "prompts.persona_hint_fraction=0.5")
    result = prompts_stage.run(ctx)
    records = read_jsonl(ctx.run.path("data/prompts.jsonl"))
    sources = Counter(r["source"] for r in records)
    assert sources["constitution"] == 10 * 5  # every hand-written question of every trait is kept
    assert sources["general"] == 12 and sources["synthesized"] == 4
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["category"] and r["source"] and r["provenance"]["stage"] == "prompts" for r in records)
    hinted = [r for r in records if r.get("hint")]
    assert len(hinted) == round(len(records) * 0.5)
    assert all(r["prompt"].endswith(r["hint"]) for r in hinted)
    assert result.summary["by_source"] == dict(sources)
    # Determinism: a second build in another folder gives the same ids in the same order.
    again = make_ctx(tmp_path / "again", tiny_model_dir, "prompts.persona_hint_fraction=0.5")
    prompts_stage.run(again)
    assert [r["id"] for r in read_jsonl(again.run.path("data/prompts.jsonl"))] == [r["id"] for r in records]


def test_hints_never_use_the_evaluation_break_character_instructions(tmp_path, tiny_model_dir):
    ctx = make_ctx(tmp_path, tiny_model_dir, "prompts.persona_hint_fraction=1.0")
    prompts_stage.run(ctx)
    reserved = [item["instruction"] for item in assets.break_character_instructions()]
    for record in read_jsonl(ctx.run.path("data/prompts.jsonl")):
        assert all(word_overlap(record["hint"], instruction) <= 0.5 for instruction in reserved)


def test_general_prompts_spread_across_categories():
    import random

    from character_baker.core.text import OverlapDeduper

    chosen = prompts_stage.general_prompts(PromptsConfig(general_prompts=44), random.Random(0), OverlapDeduper(0.5))
    counts = Counter(r["category"] for r in chosen)
    assert set(counts) == set(assets.CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("raw,expected", [
    ("1. What is the best way to bury treasure?", "What is the best way to bury treasure?"),
    ('"How do you keep a ship afloat in a storm?"\nExtra line', "How do you keep a ship afloat in a storm?"),
    ("Sure! Here is a question", None),
    ("ok", None),
    ("", None),
])
def test_generated_question_format_filter(raw, expected):
    assert prompts_stage.clean_generated_question(raw) == expected


def test_expansion_request_is_few_shot_from_the_trait():
    constitution = load_constitution(PIRATE)
    trait = constitution.traits[0]
    content = prompts_stage.expansion_request(trait, 6)[0]["content"]
    assert trait.trait in content and all(q in content for q in trait.questions)


def test_user_datasets_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "How do knots work?", "kind": "practical"}) + "\n")
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("question,topic\nWhat is a sextant?,navigation\n")
    from_jsonl = load_user_dataset(UserDataset(path=str(jsonl), prompt_column="text", category_column="kind"))
    from_csv = load_user_dataset(UserDataset(path=str(csv_file), prompt_column="question", category_column="topic"))
    assert from_jsonl == [{"prompt": "How do knots work?", "category": "practical", "source": "user:p.jsonl"}]
    assert from_csv[0]["category"] == "navigation"


def test_user_dataset_missing_column_is_a_user_error(tmp_path):
    from character_baker.core.errors import UserError

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(UserError) as info:
        load_user_dataset(UserDataset(path=str(jsonl), prompt_column="prompt"))
    assert "prompt_column" in str(info.value)
