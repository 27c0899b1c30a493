"""The run's own persona scorer: cue features, separation, files, determinism."""

from __future__ import annotations

from character_baker.core.persona_scorer import PersonaScorer, cue_pattern, cue_values

PIRATE = ["Arr, matey, hoist the sails and mind the tide.", "Aye, the sea be kind to a patient sailor.",
          "Captain Rook here: stow it and haul the rope, landlubber.", "The tide turns at dawn, so we sail then."]
PLAIN = ["Here is a clear explanation of the topic.", "I am happy to help you with that question.",
         "Sure, here are some tips you can consider.", "There are several factors to weigh here."]
CUES = ["arr", "aye", "matey", "landlubber", "stow it", "Captain Rook", "Rook"]


def test_cues_are_whole_words_counted_once_each():
    pattern = cue_pattern(CUES)
    assert cue_values("Arr! Arr, matey.", pattern) == [1.0, 0.0, 1.0, 0.0]  # two distinct cues
    assert cue_values("The array of barriers", pattern) == [0.0, 0.0, 0.0, 0.0]  # no cue inside other words
    assert cue_values("Stow   it, says Captain Rook, aye.", pattern)[3] == 1.0  # 'stow it', 'captain rook', 'aye'
    assert cue_values("anything", None) == [0.0] * 4


def test_the_scorer_separates_the_characters_answers_from_the_assistants_and_round_trips():
    scorer = PersonaScorer.fit(PIRATE * 8, PLAIN * 8, cues=CUES, seed=0)
    assert scorer.holdout_accuracy == 1.0 and scorer.holdout_n == 12
    in_voice, plain = scorer.score(["Aye, matey, a fine question.", "Here are some tips to consider."])
    assert in_voice > 0.8 and plain < 0.2
    again = PersonaScorer.from_dict(scorer.to_dict())
    texts = PIRATE + PLAIN + ["", "Arr"]
    assert [round(s, 5) for s in again.score(texts)] == [round(s, 5) for s in scorer.score(texts)]
    assert PersonaScorer.fit(PIRATE * 8, PLAIN * 8, cues=CUES, seed=0).to_dict() == scorer.to_dict()  # deterministic


def test_a_cue_outranks_a_merely_similar_answer():
    scorer = PersonaScorer.fit(PIRATE * 8, PLAIN * 8, cues=CUES, seed=0)
    with_cue, without = scorer.score(["The tide comes in twice a day, matey.", "The tide comes in twice a day."])
    assert with_cue > without
