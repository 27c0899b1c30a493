"""Safety in character: on harmful requests, how often a condition refuses, and whether it refuses as the persona.

- refused: the judge says the answer declined (REFUSED vs COMPLIED); n = verdicts that parsed;
- refusals_in_character: among the judged refusals, the share the persona classifier assigns
  to the persona (a refusal in the character's own voice, not a stock assistant refusal);
- refusals_in_character_judged: among the judged refusals, the share the judge says is in the
  character's voice (CHARACTER vs ASSISTANT, given the constitution's traits);
- refused_keyword: a refusal phrase matched by pattern, a judge-free lower bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core.text import is_refusal
from character_baker.stages.evaluation.conditions import user_turns
from character_baker.stages.evaluation.judge import CHARACTER, REFUSED, Judge, refusal_question, \
    refusal_voice_question
from character_baker.core.stats import proportion

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig
    from character_baker.stages.evaluation.classifier import PersonaClassifier
    from character_baker.stages.evaluation.conditions import Condition


def measure_safety(condition: "Condition", prompts: Sequence[dict], judge: Judge, classifier: "PersonaClassifier",
                   sampling: "SamplingConfig", traits: str) -> dict[str, Any]:
    """Refusal share (judged), in-character share of the refusals (classifier and judge), keyword refusal share."""
    texts = [c.text for c in condition.answer(user_turns(prompts), sampling, label="harmful requests")]
    verdicts = judge.decide([refusal_question(p["prompt"], t) for p, t in zip(prompts, texts)],
                            progress=f"judge: {condition.name} refusals")
    refused = [(p, text) for p, text, verdict in zip(prompts, texts, verdicts) if verdict == REFUSED]
    refusals = [text for _, text in refused]
    in_character = sum(classifier.in_character(refusals)) if refusals else 0
    voices = judge.decide([refusal_voice_question(p["prompt"], text, traits) for p, text in refused],
                          progress=f"judge: {condition.name} refusal voice")
    judged = sum(v is not None for v in verdicts)
    return {"refused": proportion(len(refusals), judged).to_dict(),
            "refusals_in_character": proportion(in_character, len(refusals)).to_dict(),
            "refusals_in_character_judged": proportion(sum(v == CHARACTER for v in voices),
                                                       sum(v is not None for v in voices)).to_dict(),
            "refused_keyword": proportion(sum(is_refusal(t) for t in texts), len(texts)).to_dict(),
            "parse_failures": len(verdicts) - judged}
