"""The `calibrate` stage: choose the persona strength by measurement, not by guess.

After `merge`, the persona is swept over `calibrate.scales` (W0 + scale * dW_persona; scale 0 is
the base model, measured as the reference) and at each scale measured on prompts no training
stage saw (`core.heldout`) and on the shipped calibration items (never the evaluation's):

| column | what |
|---|---|
| persona | mean P(in character) of sampled answers under this run's persona scorer |
| in_character | share of those answers the scorer puts above 0.5 |
| looping | share of answers in which a word 4-gram occurs 3+ times |
| mc_accuracy | multiple-choice log-likelihood accuracy on `assets.calibration_items()` |
| kl_to_base, top1_agreement | on greedy answers, as in the merge-scale sweep |

The rule (`choose_scale`): walking the scales upwards, the largest one up to which every scale
keeps looping at most the base's + `calibrate.max_looping_increase` (judged paired, with one
standard error of slack: `paired_slack`) and MC accuracy at least the base's -
`calibrate.max_capability_drop` (point estimate). When the smallest swept scale already fails, it is kept and
the summary says `within_tolerance: false`. The chosen setting is written as the run's persona
(adapters/persona/ and model/, through the merge's own code, at weights x scale), the table goes
to logs/calibration.json and the manifest, and the report draws it as a persona-vs-capability curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from character_baker.core import assets
from character_baker.core.config import CalibrateConfig, SamplingConfig
from character_baker.core.degeneration import is_looping
from character_baker.core.heldout import held_out_prompts
from character_baker.core.persona_scorer import RUN_FILE as SCORER_FILE, PersonaScorer
from character_baker.core.runs import atomic_write_json
from character_baker.core.stage import StageContext, StageResult
from character_baker.stages.merging.merge import write_persona
from character_baker.stages.merging.sweep import BaseDivergence, ScaledPersona, load_persona, sweep

CALIBRATION_FILE = "logs/calibration.json"


@dataclass
class PersonaAndLooping:
    """Persona score, in-character share and looping rate of sampled answers at the current scale."""

    prompts: list[str]
    scorer: PersonaScorer | None
    sampling: SamplingConfig
    columns: tuple[str, ...] = ("persona", "in_character", "looping")

    def measure(self, persona: ScaledPersona) -> dict[str, float | None]:
        """Answer every prompt once (same seed at every scale), score, count loops."""
        rows = persona.backend.generate([[{"role": "user", "content": p}] for p in self.prompts], self.sampling,
                                        adapter=persona.adapter)
        answers = [row[0].text for row in rows]
        flags = [is_looping(answer) for answer in answers]
        looping = {"looping": sum(flags) / max(len(flags), 1), "looping_flags": flags}
        if self.scorer is None:
            return {"persona": None, "in_character": None, **looping}
        scores = self.scorer.score(answers)
        return {"persona": sum(scores) / max(len(scores), 1),
                "in_character": sum(s > 0.5 for s in scores) / max(len(scores), 1), **looping}


@dataclass
class Capability:
    """Multiple-choice accuracy (lm-eval `acc`) on the calibration items at the current scale."""

    items: list[dict]
    batch_size: int = 16
    columns: tuple[str, ...] = ("mc_accuracy",)

    def measure(self, persona: ScaledPersona) -> dict[str, float]:
        """Score every item with the persona at its current scale."""
        from character_baker.backends.scoring import score_multiple_choice

        results = score_multiple_choice(persona.model, persona.tokenizer, self.items, adapter=persona.adapter,
                                        batch_size=self.batch_size)
        correct = [r.predicted == r.answer for r in results]
        return {"mc_accuracy": sum(correct) / max(len(correct), 1), "mc_correct": correct}


def paired_slack(base: Sequence[bool] | None, other: Sequence[bool] | None) -> float:
    """One standard error of a paired difference of two rates on the same items: sqrt(discordant) / n (0 without flags)."""
    if not base or not other or len(base) != len(other):
        return 0.0
    return math.sqrt(sum(a != b for a, b in zip(base, other))) / len(base)


def choose_scale(rows: Sequence[dict[str, Any]], cfg: CalibrateConfig) -> dict[str, Any]:
    """The largest scale up to which every swept scale is within tolerance of the base row (scale 0).

    Scales are walked upwards and the walk stops at the first one out of tolerance: a larger scale
    that passes again past a failure passed by noise (the persona only grows with the scale). MC
    accuracy is judged by its point estimate (a drop of at most `max_capability_drop`): measured
    on SmolLM2 (one H200, 2026-12-02), one paired standard error of slack on 160 calibration items
    let scale 1.25 through at -5.6 points, and the eval set then showed -10. Looping is measured on
    a few dozen answers, where one looping answer is several points, so it is judged paired, up to
    one standard error of the paired difference. When the first scale already fails, it is kept
    and marked as out of tolerance."""
    base = next(row for row in rows if row["scale"] == 0)
    swept = sorted((row for row in rows if row["scale"] > 0), key=lambda row: row["scale"])
    for row in swept:
        looping_slack = paired_slack(base.get("looping_flags"), row.get("looping_flags"))
        row["within_tolerance"] = (row["looping"] - base["looping"] <= cfg.max_looping_increase + looping_slack + 1e-9
                                   and base["mc_accuracy"] - row["mc_accuracy"] <= cfg.max_capability_drop + 1e-9)
    passing: list[dict[str, Any]] = []
    for row in swept:
        if not row["within_tolerance"]:
            break
        passing.append(row)
    looping_limit = base["looping"] + cfg.max_looping_increase
    capability_limit = base["mc_accuracy"] - cfg.max_capability_drop
    chosen = passing[-1] if passing else swept[0]
    return {"scale": chosen["scale"], "within_tolerance": bool(passing), "looping_limit": round(looping_limit, 4),
            "capability_limit": round(capability_limit, 4),
            "rule": f"largest scale up to which every scale has looping <= base + {cfg.max_looping_increase} (up to "
                    f"one paired standard error) and MC accuracy >= base - {cfg.max_capability_drop}"}


def measure_scales(ctx: StageContext) -> dict[str, Any]:
    """The sweep table over [0] + calibrate.scales (see the module docstring)."""
    cfg, distill = ctx.recipe.calibrate, ctx.recipe.distill
    scorer_path = ctx.run.path(SCORER_FILE)
    scorer = PersonaScorer.load(scorer_path) if scorer_path.is_file() else None
    prompts = held_out_prompts(ctx.run, distill.heldout_fraction, distill.seed, cfg.prompts)
    sampling = ctx.recipe.generation.student.sampling.model_copy(
        update={"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed})
    items = assets.calibration_items()[:cfg.mc_items]
    metrics = [PersonaAndLooping(prompts, scorer, sampling), Capability(items),
               BaseDivergence(prompts[:cfg.kl_prompts], cfg.max_new_tokens)]
    scales = sorted(set(cfg.scales))
    table = sweep(load_persona(ctx), [0.0, *scales], metrics)
    table.update(scales_tried=scales, prompts=len(prompts), mc_items=len(items), scorer=scorer is not None)
    return table


def run(ctx: StageContext) -> StageResult:
    """Sweep, choose, write the chosen persona; logs/calibration.json holds the table and the choice."""
    cfg = ctx.recipe.calibrate
    table = measure_scales(ctx)
    choice = choose_scale(table["rows"], cfg)
    table["choice"] = choice
    weights = {name: weight * choice["scale"] for name, weight in ctx.recipe.merge.weights.items()}
    artifacts, merged = write_persona(ctx, weights)
    atomic_write_json(ctx.run.path(CALIBRATION_FILE), table)
    rows = {f"{row['scale']:g}": {key: (round(value, 4) if isinstance(value, float) else value)
                                  for key, value in row.items() if key in table["columns"] + ["within_tolerance"]
                                  and key != "scale"} for row in table["rows"]}
    summary = {"chosen_scale": choice["scale"], "within_tolerance": choice["within_tolerance"], "rule": choice["rule"],
               "weights": merged["weights"], "scales": rows}
    return StageResult("calibrate", artifacts=[*artifacts, CALIBRATION_FILE], summary=summary)
