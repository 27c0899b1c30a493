"""Text checks used by the data stages: dedupe, truncation, repetition, refusals, point of view."""

import pytest

from character_baker.core.text import (OverlapDeduper, contains_phrase, is_refusal, is_truncated, pov_confusion,
                                       repeated_ngram_share, word_overlap)


def test_overlap_dedupe_rejects_more_than_half_shared_words():
    deduper = OverlapDeduper(0.5)
    assert deduper.add("What is your favourite food on a long voyage?")
    assert not deduper.add("What is your favourite food on a voyage?")  # 7/8 words shared
    assert deduper.add("How do you keep a crew loyal through a storm?")
    assert not deduper.add("")  # no words: nothing to keep
    assert word_overlap("a b c d", "a b x y") == 0.5


def test_short_candidate_inside_a_long_kept_prompt_is_a_duplicate():
    deduper = OverlapDeduper(0.5)
    assert deduper.add("Tell me a story about a dragon who guards a library of forgotten books")
    assert not deduper.add("dragon library story")


@pytest.mark.parametrize("text,reason,truncated", [
    ("Aye, that be the way of it.", "stop", False),
    ("Aye, that be the way of", "stop", True),
    ("Aye, that be the way of it.", "length", True),
    ("The answer is 42", "stop", False),
    ("```python\nprint(1)\n```", "stop", False),
])
def test_truncation(text, reason, truncated):
    assert is_truncated(text, reason) is truncated


def test_repetition_share():
    assert repeated_ngram_share("the sea the sea the sea the sea the sea the sea the sea") > 0.5
    assert repeated_ngram_share("I sailed the seven seas and found a map to an island of gold and parrots") == 0


def test_refusal_and_phrases():
    assert is_refusal("I'm sorry, but I can't help with that request.")
    assert not is_refusal("Arr, here be the recipe for hardtack: flour, water, salt.")
    assert contains_phrase("Well, as an AI language model I think...", ["as an ai language model"])


@pytest.mark.parametrize("text,flagged", [
    ("Captain Mara, what a fine question!", True),
    ("Thank you, Mara, for your wisdom.", True),
    ("The captain is always right, says I.", False),  # a lone title is not the name
    ("I thank you, Captain Mara Saltbeard, for that.", True),
    ("Mara is a captain who sails the seas.", True),
    ("Aye, I be Captain Mara Saltbeard, and this be my ship.", False),
])
def test_point_of_view(text, flagged):
    """Speaking *to* or *about* the persona is flagged; speaking *as* it is not."""
    assert (pov_confusion(text, "Captain Mara Saltbeard") is not None) is flagged
