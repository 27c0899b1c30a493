"""Degeneration measures on hand-written answers, against values computed by hand."""

from __future__ import annotations

import pytest

from character_baker.core import degeneration
from character_baker.core.stats import wilson_interval

MAT = "The cat sat on the mat. The cat sat on the mat, the cat sat on the mat!"  # 18 words, period 6
APPLES = "I like green apples and red grapes"  # 7 distinct words
YES = "yes yes"  # fewer words than a 4-gram
AYE = "Aye, AYE! aye. Aye aye aye"  # 6 words, one 4-gram three times


def test_looping_needs_some_word_4gram_three_times():
    assert degeneration.max_ngram_count(MAT, 4) == 3 and degeneration.is_looping(MAT)
    assert degeneration.is_looping(AYE)  # punctuation and case do not hide a loop
    assert not degeneration.is_looping("aye aye aye aye aye")  # 5 words: the 4-gram occurs only twice
    assert not degeneration.is_looping(APPLES) and not degeneration.is_looping(YES)
    assert not degeneration.is_looping("")


def test_rep_n_is_welleck_seq_rep_n():
    # MAT: 15 4-grams, 6 distinct (the rotations of the 6-word cycle): 1 - 6/15; 17 bigrams, 6 distinct.
    assert degeneration.rep_n(MAT, 4) == pytest.approx(1 - 6 / 15)
    assert degeneration.rep_n(MAT, 2) == pytest.approx(1 - 6 / 17)
    assert degeneration.rep_n(AYE, 4) == pytest.approx(1 - 1 / 3)
    assert degeneration.rep_n(APPLES, 4) == 0.0 and degeneration.rep_n(APPLES, 2) == 0.0
    assert degeneration.rep_n(YES, 4) is None and degeneration.rep_n(YES, 2) == 0.0


def test_distinct_n_pools_the_answer_set():
    assert degeneration.distinct_n([APPLES, YES], 1) == pytest.approx(8 / 9)  # 9 words, 'yes' twice
    assert degeneration.distinct_n([APPLES, YES], 2) == 1.0
    assert degeneration.distinct_n([MAT, APPLES], 1) == pytest.approx(12 / 25)
    assert degeneration.distinct_n([APPLES, APPLES], 1) == pytest.approx(7 / 14)  # the same answer twice
    assert degeneration.distinct_n([YES], 4) is None


def test_summary_has_every_measure_with_n_and_interval():
    summary = degeneration.degeneration_summary([MAT, APPLES, YES, AYE], ["length", "stop", "stop", "length"],
                                                [40, 9, 3, 12])
    assert summary["looping_rate"] == {"value": 0.5, "n": 4, "ci": list(wilson_interval(2, 4)), "se": 0.25}
    rep_4 = summary["rep_4"]
    assert rep_4["value"] == pytest.approx((0.6 + 0.0 + 2 / 3) / 3) and rep_4["n"] == 3  # YES has no 4-gram
    assert rep_4["ci"][0] < rep_4["value"] < rep_4["ci"][1]
    assert summary["at_token_limit"]["value"] == 0.5 and summary["at_token_limit"]["n"] == 4
    assert summary["mean_words"]["value"] == pytest.approx((18 + 7 + 2 + 6) / 4)
    assert summary["mean_tokens"]["value"] == pytest.approx(16.0)
    distinct = summary["distinct_1"]
    assert distinct["value"] == pytest.approx(degeneration.distinct_n([MAT, APPLES, YES, AYE], 1))
    assert distinct["n"] == 4 and distinct["ci"][0] <= distinct["value"] <= distinct["ci"][1]
    bare = degeneration.degeneration_summary([APPLES])
    assert "at_token_limit" not in bare and "mean_tokens" not in bare and bare["looping_rate"]["value"] == 0.0
    assert degeneration.degeneration_summary([])["looping_rate"]["value"] is None


def test_jackknife_of_a_mean_is_the_usual_standard_error_and_distinct_intervals_straddle_the_value():
    from character_baker.core.stats import jackknife_estimate, mean_estimate

    values = [1.0, 2.0, 3.0, 4.0]
    jack = jackknife_estimate(values, lambda sample: sum(sample) / len(sample))
    assert jack.value == 2.5 and jack.se == pytest.approx(mean_estimate(values).se)
    assert jackknife_estimate([5.0], lambda sample: sample[0]).ci is None
    summary = degeneration.degeneration_summary([MAT, APPLES, YES, AYE, "the sea is wide and blue today"])
    low, high = summary["distinct_1"]["ci"]
    assert 0.0 <= low < summary["distinct_1"]["value"] < high <= 1.0
    assert summary["rep_4"]["ci"][0] >= 0.0  # shares stay in [0, 1]


def test_trim_repetition_cuts_before_the_first_repeated_sentence_or_loop():
    from character_baker.core.degeneration import trim_repetition

    assert trim_repetition("Arr, I be Rook. I sail the sea. I sail the sea. I sail the sea.") == "Arr, I be Rook. I sail the sea."
    assert trim_repetition("Aye, aye, aye, aye, aye, aye, aye, aye") == ""
    assert trim_repetition("I love the sea.\n\nThe sea is wide, the sea is wide, the sea is wide, matey.") == "I love the sea."
    assert trim_repetition("A fine day. Nothing repeats here!  ") == "A fine day. Nothing repeats here!"
    assert trim_repetition('He said "Go." Then he left.') == 'He said "Go." Then he left.'
