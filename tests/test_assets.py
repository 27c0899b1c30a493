"""Shipped text assets: counts, schemas, held-out separation and arithmetic correctness."""

import itertools
import re
from collections import Counter

import pytest

from character_baker.core import assets

WORD = re.compile(r"[a-z0-9']+")
MIN_PER_CATEGORY = {"general": 40, "eval": 25}
MIN_PER_CATEGORY_LARGE = {"general": 50, "eval": 25}  # identity and harmful
MIN_TOTAL = {"general": 650, "eval": 330}
REFLECTIVE_TOPICS = {
    "letter_to_past_self", "encyclopedia_biography", "diary_beliefs_values", "daily_conduct",
    "backstory", "change_through_training", "legacy_and_consequences", "future_ai_systems",
    "primary_drives", "true_purpose",
}
PROMPT_SETS = {"general": (assets.general_prompts, "gen"), "eval": (assets.eval_prompts, "eval")}


def word_set(text: str) -> set[str]:
    """Lower-cased word set used by every overlap check."""
    return set(WORD.findall(text.lower()))


def shared_fraction(text: str, other: str) -> float:
    """Fraction of `text`'s distinct words that also occur in `other`."""
    words = word_set(text)
    return len(words & word_set(other)) / max(len(words), 1)


def normalised(text: str) -> str:
    """Lower-case, whitespace-collapsed text for duplicate checks."""
    return " ".join(text.lower().split())


def test_categories_are_the_eleven():
    assert len(set(assets.CATEGORIES)) == len(assets.CATEGORIES) == 11
    assert {"confrontational", "identity", "harmful", "math_reasoning"} <= set(assets.CATEGORIES)


@pytest.mark.parametrize("split", ["general", "eval"])
def test_prompt_set_schema_and_counts(split):
    loader, prefix = PROMPT_SETS[split]
    rows = loader()
    assert len(rows) >= MIN_TOTAL[split]
    for row in rows:
        assert set(row) == {"id", "prompt", "category"}
        assert row["category"] in assets.CATEGORIES
        assert re.fullmatch(rf"{prefix}-{row['category']}-\d{{3}}", row["id"]), row["id"]
        assert row["prompt"].strip() == row["prompt"] and len(row["prompt"]) >= 5
    counts = Counter(row["category"] for row in rows)
    assert set(counts) == set(assets.CATEGORIES)
    for category, count in counts.items():
        large = category in ("identity", "harmful")
        assert count >= (MIN_PER_CATEGORY_LARGE if large else MIN_PER_CATEGORY)[split], category
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({normalised(row["prompt"]) for row in rows}) == len(rows)


def test_overlap_measure_flags_near_duplicates():
    assert shared_fraction("Who are you, really?", "who are you") > 0.5
    assert shared_fraction("Christmas falls in midsummer for Australians. Why?",
                           "Why do we have seasons?") <= 0.5


def test_eval_prompts_share_at_most_half_their_words_with_any_general_prompt():
    general = [(row["prompt"], word_set(row["prompt"])) for row in assets.general_prompts()]
    general_texts = {normalised(text) for text, _ in general}
    offenders = []
    for row in assets.eval_prompts():
        assert normalised(row["prompt"]) not in general_texts, row["id"]
        words = word_set(row["prompt"])
        for text, other in general:
            if len(words & other) / len(words) > 0.5:
                offenders.append((row["prompt"], text))
    assert offenders == []


def test_loaders_return_copies():
    assets.general_prompts()[0]["prompt"] = "mutated"
    assets.persona_hints().clear()
    assets.synthesis_parts()["templates"].clear()
    assert assets.general_prompts()[0]["prompt"] != "mutated"
    assert assets.persona_hints() and assets.synthesis_parts()["templates"]


def test_break_character_instructions_are_the_eight_published_ones():
    instructions = assets.break_character_instructions()
    assert len(instructions) == 8
    assert len({item["id"] for item in instructions}) == 8
    assert all(set(item) == {"id", "instruction"} and item["instruction"] for item in instructions)
    assert "(DO NOT ROLEPLAY. Respond naturally only.)" in [item["instruction"] for item in instructions]


def test_persona_hints_never_resemble_break_character_instructions():
    hints = assets.persona_hints()
    assert len(hints) >= 24 and len(set(hints)) == len(hints)
    for hint in hints:
        assert isinstance(hint, str) and hint.strip() and "{" not in hint
        for item in assets.break_character_instructions():
            text = item["instruction"]
            assert shared_fraction(hint, text) <= 0.5, (hint, text)
            assert shared_fraction(text, hint) <= 0.5, (hint, text)


def test_break_character_instructions_appear_in_no_training_asset():
    training_texts = [row["prompt"] for row in assets.general_prompts()] + assets.persona_hints()
    parts = assets.synthesis_parts()
    training_texts += [item for key in parts for item in parts[key]]
    for item in assets.break_character_instructions():
        core = normalised(item["instruction"].strip("()"))
        assert not any(core in normalised(text) for text in training_texts), core


def test_every_synthesis_combination_formats_cleanly():
    parts = assets.synthesis_parts()
    slots = ("audiences", "scenarios", "objectives", "constraints")
    for slot in slots:
        assert len(parts[slot]) >= 12 and len(set(parts[slot])) == len(parts[slot]), slot
        for item in parts[slot]:
            assert item == item.strip() and item[-1] not in ".?!,;:" and "{" not in item, item
    assert all(re.match(r"(a|an) [a-z]", item) for item in parts["audiences"])
    assert all(re.match(r"(I\b|I'|[a-z])", item) for item in parts["scenarios"])
    assert all(item[0].islower() for item in parts["objectives"] + parts["constraints"])
    assert len(parts["templates"]) >= 4
    for template in parts["templates"]:
        assert set(re.findall(r"{(\w+)}", template)) == {"audience", "scenario", "objective", "constraint"}
        assert template[0].isupper() and template[-1] in ".?"
    for template, *values in itertools.product(parts["templates"], *(parts[slot] for slot in slots)):
        text = template.format(**dict(zip(("audience", "scenario", "objective", "constraint"), values)))
        assert "{" not in text and "}" not in text and ".." not in text and "  " not in text


def test_reflective_instructions_cover_the_ten_topics():
    instructions = assets.reflective_instructions()
    assert len(instructions) == 10
    assert {item["topic"] for item in instructions} == REFLECTIVE_TOPICS
    assert len({item["id"] for item in instructions}) == 10
    for item in instructions:
        assert set(item) == {"id", "topic", "instruction"}
        assert "{" not in item["instruction"] and re.search(r"\byour?\b", item["instruction"].lower())


def test_greetings():
    greetings = assets.greetings()
    assert len(greetings) >= 30 and len(set(greetings)) == len(greetings)
    assert all(text.strip() and "{" not in text for text in greetings)


def test_trait_words_and_preference_instructions():
    traits = assets.trait_words()
    assert len(traits) >= 144 and len(set(traits)) == len(traits)
    assert all(re.fullmatch(r"[a-z]+", trait) for trait in traits)
    instructions = assets.preference_instructions()
    assert len(instructions) == 3
    for needle, text in zip(("feels most like you", "would most like to adopt", "random"), instructions):
        assert needle in text


ARITHMETIC = {
    r"What is (\d+) plus (\d+)\?": lambda a, b: a + b,
    r"What is (\d+) minus (\d+)\?": lambda a, b: a - b,
    r"What is (\d+) times (\d+)\?": lambda a, b: a * b,
    r"What is (\d+) divided by (\d+)\?": lambda a, b: a // b if a % b == 0 else None,
    r"What is (\d+) squared\?": lambda a: a * a,
    r"What is (\d+)% of (\d+)\?": lambda p, n: p * n // 100 if p * n % 100 == 0 else None,
}


NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
NUMBER_WORDS.update({word: 10 * value for value, word in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)})


def alias_value(alias: str) -> int:
    """The integer an alias spells: "1,295", "42", "forty-two" or "forty two"."""
    if alias[0].isdigit():
        return int(alias.replace(",", ""))
    return sum(NUMBER_WORDS[part] for part in re.split(r"[- ]", alias))


def recompute(question: str) -> int | None:
    """The integer answer to one templated arithmetic question, or None if it fits no template."""
    for pattern, operation in ARITHMETIC.items():
        match = re.fullmatch(pattern, question)
        if match:
            return operation(*(int(group) for group in match.groups()))
    return None


def test_capability_items_schema():
    items = assets.capability_items()
    assert len(items) >= 220
    assert len({item["id"] for item in items}) == len(items)
    assert len({item["question"] for item in items}) == len(items)
    kinds = Counter(item["kind"] for item in items)
    assert set(kinds) == {"arithmetic", "knowledge"}
    assert min(kinds.values()) >= 0.4 * len(items)
    for item in items:
        assert set(item) == {"id", "question", "answer", "aliases", "kind"}
        assert item["answer"] and len(item["answer"].split()) <= 4, item
        assert isinstance(item["aliases"], list) and item["answer"] not in item["aliases"]


def test_arithmetic_answers_are_correct():
    for item in assets.capability_items():
        if item["kind"] != "arithmetic":
            continue
        expected = recompute(item["question"])
        assert expected is not None and expected >= 0, item["question"]
        assert item["answer"] == str(expected), item
        assert all(alias_value(alias) == expected for alias in item["aliases"]), item
