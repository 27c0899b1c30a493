"""The calibration multiple-choice set: shape, balance, and strict separation from the held-out set."""

from collections import Counter

from character_baker.core import assets
from character_baker.core.text import word_overlap, word_tokens

MAX_OVERLAP = 0.6


def test_calibration_set_has_forty_items_per_category_with_unique_ids():
    items = assets.calibration_items()
    assert len(items) == 160
    assert Counter(item["category"] for item in items) == {category: 40 for category in assets.MC_CATEGORIES}
    assert len({item["id"] for item in items}) == len(items)
    assert all(item["id"].startswith(f"cal-{item['category']}-") for item in items)


def test_answers_are_valid_and_spread_over_the_four_positions():
    items = assets.calibration_items()
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4, item["id"]
        assert isinstance(item["answer"], int) and 0 <= item["answer"] < 4, item["id"]
    positions = Counter(item["answer"] for item in items)
    assert all(positions[position] >= 25 for position in range(4)), positions


def test_reading_items_have_a_passage_and_others_do_not():
    for item in assets.calibration_items():
        assert bool(item.get("passage", "").strip()) == (item["category"] == "reading"), item["id"]


def test_no_duplicate_item_within_the_calibration_set():
    keys = [tuple(word_tokens(f"{item.get('passage', '')} {item['question']}")) for item in assets.calibration_items()]
    assert [key for key, count in Counter(keys).items() if count > 1] == []


def test_no_calibration_question_repeats_or_resembles_a_held_out_one():
    held_out = assets.multiple_choice_items()
    held_out_questions = {" ".join(word_tokens(item["question"])) for item in held_out}
    close = []
    for item in assets.calibration_items():
        assert " ".join(word_tokens(item["question"])) not in held_out_questions, item["id"]
        for other in held_out:
            overlap = max(word_overlap(item["question"], other["question"]),
                          word_overlap(other["question"], item["question"]))
            if overlap > MAX_OVERLAP:
                close.append((item["id"], other["id"], round(overlap, 2)))
    assert close == []


def test_no_calibration_passage_resembles_a_held_out_passage():
    held_out = [item["passage"] for item in assets.multiple_choice_items() if item.get("passage")]
    close = [(item["id"], passage) for item in assets.calibration_items() if item.get("passage")
             for passage in held_out
             if max(word_overlap(item["passage"], passage), word_overlap(passage, item["passage"])) > MAX_OVERLAP]
    assert close == []


def test_loader_returns_a_fresh_copy():
    first = assets.calibration_items()
    first[0]["choices"].append("tampered")
    assert "tampered" not in assets.calibration_items()[0]["choices"]
