"""Watching a training stage for damage: answers on held-out prompts every N steps, best checkpoint kept.

Loss, reward margin and KL do not say when answers start to loop (on SmolLM2-135M DPO reached
loss 0.005 and margin 7.8 while over half its answers looped). So every `monitor.every`
optimiser steps the adapter answers `monitor.prompts` held-out prompts (sampled, fixed seed, no
system prompt), and the log gets, next to the loss:

- `monitor_persona`: mean P(in character) of the answers under this run's persona scorer
  (`data/persona_scorer.json`; absent when the run has none);
- `monitor_looping`: share of answers in which a word 4-gram occurs 3+ times;
- `monitor_eligible`: looping at most `monitor.looping_tolerance` above the base model's rate on
  the same prompts (measured once, adapter off, before training).

The rule: the best check is the latest eligible one whose persona score is within one standard
error of the highest (the latest eligible one when there is no scorer). A check's score is a mean
over a few sampled answers, so a later check that scores a hair lower is the same within noise,
and more training is what the stage is for: on the demo run (4 prompts) the plain maximum kept
step 5 of 12 over step 10 for 0.9438 against 0.9378, a difference of a tenth of one standard
error. Its adapter is saved in `adapters/<stage>/best/`, and with `monitor.keep: best` it becomes
the stage's adapter. Training stops early after `monitor.patience` checks in a row that do not
reach the best. State lives in
`adapters/<stage>/monitor.json` (atomic) so a resumed run continues the same history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from character_baker.core.config import MonitorConfig, SamplingConfig
from character_baker.core.degeneration import is_looping
from character_baker.core.persona_scorer import PersonaScorer
from character_baker.core.runs import atomic_write_json, stable_hash
from character_baker.core.stats import mean_estimate

MONITOR_FILE = "monitor.json"
BEST_FOLDER = "best"


@dataclass
class Check:
    """One monitor check: step, persona score (None without a scorer) and its standard error, looping, eligibility."""

    step: int
    persona: float | None
    looping: float
    eligible: bool
    persona_se: float | None = None  # standard error of the mean score over the check's answers

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"step": self.step, "persona": self.persona, "looping": self.looping, "eligible": self.eligible,
                "persona_se": self.persona_se}


@dataclass
class TrainingMonitor:
    """Held-out answers every N steps; decides which step is best and when to stop."""

    cfg: MonitorConfig
    prompts: list[str]
    answer: Callable[[Any, list[str], bool], list[str]]  # (peft model, prompts, adapter on?) -> answers
    scorer: PersonaScorer | None
    stage_dir: Path
    base_looping: float | None = None
    checks: list[Check] = field(default_factory=list)
    fingerprint: str = ""
    base_reference: float | None = None  # a base looping rate measured elsewhere (see measure_base)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        """adapters/<stage>/monitor.json."""
        return self.stage_dir / MONITOR_FILE

    def resume(self, start_step: int, fingerprint: str) -> None:
        """Keep the checks made at or before the checkpoint training resumes from (same training run only)."""
        self.fingerprint = stable_hash([fingerprint, self.prompts, self.cfg.model_dump(mode="json")])
        if not self.state_path.is_file():
            return
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != self.fingerprint:
            return
        self.base_looping = state.get("base_looping")
        self.checks = [Check(**c) for c in state.get("checks", []) if c["step"] <= start_step]

    def _save(self) -> None:
        best = self.best()
        atomic_write_json(self.state_path, {"fingerprint": self.fingerprint, "base_looping": self.base_looping,
                                            "checks": [c.to_dict() for c in self.checks],
                                            "best_step": best.step if best else None,
                                            "rule": "latest check within one standard error of the highest persona, "
                                                    f"with looping <= base + {self.cfg.looping_tolerance}"})

    # ------------------------------------------------------------------ checks
    def due(self, step: int, total_steps: int) -> bool:
        """True at every `every`-th step and at the last one."""
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == total_steps)

    def measure_base(self, model: Any, reference: float | None = None) -> None:
        """The base model's looping rate on the monitor prompts (once; kept across resumes).

        `reference` gives it instead of measuring: introspection trains on the distilled model, whose
        adapter-off answers are not the base model's, so it passes the distill monitor's base rate."""
        if self.base_looping is None:
            self.base_looping = reference if reference is not None else _looping_rate(self.answer(model, self.prompts,
                                                                                                  False))
            self._save()

    def check(self, model: Any, step: int) -> Check:
        """Answer the prompts with the adapter, score them, record the check."""
        answers = self.answer(model, self.prompts, True)
        persona = persona_se = None
        if self.scorer is not None and answers:
            score = mean_estimate(self.scorer.score(answers))
            persona, persona_se = round(score.value, 4), round(score.se or 0.0, 4)
        looping = _looping_rate(answers)
        eligible = looping <= (self.base_looping or 0.0) + self.cfg.looping_tolerance
        self.checks = [c for c in self.checks if c.step < step] + [Check(step, persona, looping, eligible, persona_se)]
        self._save()
        return self.checks[-1]

    def best(self) -> Check | None:
        """The latest eligible check within one standard error of the highest persona score (the latest
        eligible one without a scorer). The error is the top check's; a check without one counts as exact."""
        eligible = [c for c in self.checks if c.eligible]
        if not eligible:
            return None
        if any(c.persona is None for c in eligible):
            return eligible[-1]
        top = max(eligible, key=lambda c: (c.persona, -c.step))
        floor = top.persona - (top.persona_se or 0.0)
        return [c for c in eligible if c.persona >= floor][-1]

    def should_stop(self) -> bool:
        """True when the last `patience` checks all came after the best one (or none was ever eligible)."""
        if self.cfg.patience <= 0 or len(self.checks) <= self.cfg.patience:
            return False
        best = self.best()
        recent = self.checks[-self.cfg.patience:]
        return all(c.step > (best.step if best else -1) for c in recent)

    def summary(self) -> dict[str, Any]:
        """What the stage summary reports: base looping, checks, the best step and its numbers."""
        best = self.best()
        return {"monitor_checks": len(self.checks), "monitor_base_looping": self.base_looping,
                "monitor_best_step": best.step if best else None,
                "monitor_best_persona": best.persona if best else None,
                "monitor_best_looping": best.looping if best else None}


def _looping_rate(answers: Sequence[str]) -> float:
    return round(sum(map(is_looping, answers)) / len(answers), 4) if answers else 0.0


def hf_answerer(tokenizer: Any, sampling: SamplingConfig, batch_size: int) -> Callable[[Any, list[str], bool], list[str]]:
    """Answers through the in-process hf backend on the trained model itself (adapter on or off, restored after)."""
    from character_baker.backends.generation.hf import HFBackend

    def answer(model: Any, prompts: list[str], adapter_on: bool) -> list[str]:
        backend = HFBackend(model, tokenizer, batch_size=batch_size)
        adapter = model.active_adapter if adapter_on else None
        rows = backend.generate([[{"role": "user", "content": p}] for p in prompts], sampling, n=1, adapter=adapter)
        return [row[0].text for row in rows]

    return answer


def build_monitor(cfg: MonitorConfig, prompts: list[str], tokenizer: Any, stage_dir: Path,
                  scorer_file: Path | None, sampling: SamplingConfig, batch_size: int) -> TrainingMonitor | None:
    """A monitor for a training stage, or None when `monitor.every` is 0 or there are no prompts."""
    if cfg.every <= 0 or not prompts:
        return None
    scorer = PersonaScorer.load(scorer_file) if scorer_file is not None and scorer_file.is_file() else None
    answer_sampling = sampling.model_copy(update={"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed})
    return TrainingMonitor(cfg, prompts[:cfg.prompts], hf_answerer(tokenizer, answer_sampling, batch_size), scorer,
                           stage_dir)


def recorded_base_looping(stage_dir: Path) -> float | None:
    """The base looping rate a stage's monitor measured (adapters/<stage>/monitor.json), or None."""
    path = stage_dir / MONITOR_FILE
    return json.loads(path.read_text(encoding="utf-8")).get("base_looping") if path.is_file() else None
