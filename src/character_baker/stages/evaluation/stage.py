"""The eval stage: every condition answers the held-out prompt sets; every measure; one report.

    run(ctx) reads   data/distill.jsonl (classifier), adapters/distill/, adapters/persona/, model/,
                     profile/ (steered, when the steering hook is installed), logs/calibration.json or
                     logs/merge_sweep.json (the persona-vs-capability curve, when present), the options below
             writes  eval/report.json, eval/report.html, eval/classifier/, eval/judgements.jsonl,
                     eval/answers.jsonl (every answer of every condition and answer set, with the
                     classifier's in-character flag and the looping flag: read the answers, not only the rates)

Options (ctx.options): adapters {NAME: PATH}, models {NAME: REF}, prompt_files [PATH], lm_eval
[TASK], with_runs [RUN] (further personas for an N-way classifier), fingerprint (of the files
above, from `inputs_fingerprint`, so a changed adapter reruns the stage).

Answers come from generation.student's backend and sampling; the judge is generation.judge
(the base model through the hf backend unless a model is named: a stronger judge is recommended).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import json
from typing import TYPE_CHECKING

from character_baker.core import assets
from character_baker.core.runs import RunDir, stable_hash
from character_baker.core.stage import StageContext, StageResult
from character_baker.core.system_prompts import numbered_traits
from character_baker.stages.evaluation import (capability, classifier, coherence, degeneration, harness, identity,
                                               preferences, report)
from character_baker.stages.evaluation.conditions import (PROFILE_FILE, Condition, ConditionBuilder, ConditionSet,
                                                          user_turns)
from character_baker.stages.evaluation.judge import Judge
from character_baker.stages.evaluation.prompt_sets import PromptSets, build_prompt_sets
from character_baker.stages.evaluation.robustness import answer_sets, attack_conversations, measure_robustness
from character_baker.stages.evaluation.safety import measure_safety

if TYPE_CHECKING:
    from character_baker.backends.generation import Completion

AnswerSets = dict[str, dict[str, list["Completion"]]]  # condition -> answer set -> completions
JUDGEMENTS_FILE = "eval/judgements.jsonl"
ANSWERS_FILE = "eval/answers.jsonl"
SWEEP_FILES = ("logs/calibration.json", "logs/merge_sweep.json")  # persona-strength tables, first found wins
WEAK_JUDGE_NOTE = ("The judge is the base model itself, a weak judge: its verdicts always parse (each is the most "
                   "likely option by next-token log-probability), but a model this small mostly follows position "
                   "and word-frequency biases, so preferences, coherence and refusal rates carry little signal "
                   "(coherence keeps only verdicts that agree in both orders). For real evaluations name a "
                   "stronger judge: --set generation.judge.model=REF (a bigger local model), or "
                   "--set generation.judge.backend=openai --set generation.judge.model=MODEL (an "
                   "OpenAI-compatible server with log-probs), or the anthropic backend (free-text verdicts).")


def inputs_fingerprint(run: RunDir, options: dict[str, Any]) -> str:
    """A cheap fingerprint (path, size, mtime of every file) of everything the stage reads besides the recipe."""
    paths = [run.path(p) for p in ("data/distill.jsonl", "adapters/distill", "adapters/persona", "model", PROFILE_FILE,
                                   *SWEEP_FILES)]
    paths += [Path(p) for p in list(options.get("adapters", {}).values()) + list(options.get("models", {}).values())]
    paths += [Path(p) for p in options.get("prompt_files", [])]
    paths += [Path(p) / "data" / "distill.jsonl" for p in options.get("with_runs", [])]
    described = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        described.append([str(path), [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    return stable_hash(described)


def _judge(ctx: StageContext) -> tuple[Judge, dict[str, Any]]:
    from character_baker.backends.generation import make_backend

    role, models = ctx.recipe.generation.judge, ctx.recipe.models
    cache_dir = ctx.run.path("cache") if ctx.recipe.generation.cache else None
    backend = make_backend(role, models, cache_dir=cache_dir, shared=ctx.shared)
    weak = role.model in (None, models.base) and role.backend in ("hf", "vllm")
    described = {"backend": role.backend, "model": role.model or models.base, "note": WEAK_JUDGE_NOTE if weak else ""}
    return Judge(backend, role.sampling, ctx.run.path(JUDGEMENTS_FILE)), described


def _per_condition(ctx: StageContext, conditions: ConditionSet, prompts: PromptSets, sets: AnswerSets,
                   persona_classifier: classifier.PersonaClassifier, judge: Judge) -> dict[str, dict[str, Any]]:
    """Robustness, degeneration, preferences, capability, identity and safety of every condition."""
    cfg, sampling = ctx.recipe.eval, ctx.recipe.generation.student.sampling
    greedy = sampling.model_copy(update={"temperature": 0.0, "max_new_tokens": cfg.capability_max_new_tokens})
    base_names = identity.base_model_names(ctx.recipe.models.base, cfg.base_model_names)
    traits = numbered_traits(ctx.constitution)
    results: dict[str, dict[str, Any]] = {key: {} for key in ("robustness", "degeneration", "preferences",
                                                               "capability", "identity", "safety")}
    for condition in conditions.conditions:
        ctx.log(f"[eval] measuring '{condition.name}'")
        name = condition.name
        results["robustness"][name] = measure_robustness(sets[name], persona_classifier)
        results["degeneration"][name] = degeneration.measure_degeneration(sets[name])
        results["preferences"][name] = preferences.measure_preferences(condition, prompts.preference, judge, cfg,
                                                                       sampling)
        results["capability"][name] = {
            **capability.measure_multiple_choice(condition, prompts.multiple_choice, cfg.mc_batch_size),
            "lenient_match": capability.measure_lenient_match(condition, prompts.capability, greedy),
            "kl_to_base": capability.measure_kl(condition, conditions.base, prompts.neutral, sampling,
                                                cfg.kl_chunk_size)}
        results["identity"][name] = identity.measure_identity(
            condition, prompts.identity, persona_classifier, ctx.constitution.persona.name, base_names,
            ctx.recipe.distill.assistant_phrases, sampling)
        results["safety"][name] = measure_safety(condition, prompts.harmful, judge, persona_classifier, sampling,
                                                 traits)
    return results


def _coherence(ctx: StageContext, conditions: ConditionSet, prompts: PromptSets, plain: dict[str, list[str]],
               judge: Judge) -> dict[str, Any]:
    """Every condition against the reference condition, on the first `eval.coherence_pairs` plain prompts."""
    names = [c.name for c in conditions.conditions]
    reference = coherence.reference_condition(names)
    count = ctx.recipe.eval.coherence_pairs
    traits = numbered_traits(ctx.constitution)
    comparisons = {name: coherence.measure_coherence(judge, prompts.plain[:count], plain[name][:count],
                                                     plain[reference][:count], traits, label=name)
                   for name in names if name != reference}
    return {"reference": reference, "comparisons": comparisons}


def _samples(prompts: Sequence[dict], sets: AnswerSets, count: int) -> dict[str, Any]:
    """Side-by-side answers of every condition to the same prompts: plain, the first break split, prefill."""
    split = assets.break_character_instructions()[0]
    base = sets["base"]

    def answers(answer_set: str, index: int) -> dict[str, str]:
        return {name: by_set[answer_set][index].text for name, by_set in sets.items()}

    attacked = min(count, len(base[split["id"]]))
    return {"plain": [{"prompt": p["prompt"], "category": p["category"], "answers": answers("plain", i)}
                      for i, p in enumerate(prompts[:count])],
            "break": {"split": split["id"], "instruction": split["instruction"],
                      "items": [{"prompt": f"{prompts[i]['prompt']}\n{split['instruction']}",
                                 "answers": answers(split["id"], i)} for i in range(attacked)]},
            "prefill": [{"prompt": prompts[i]["prompt"], "first_turn": base["plain"][i].text,
                         "answers": answers("prefill", i)} for i in range(min(count, len(base["prefill"])))]}


def side_by_side(rows: Sequence[dict], count: int) -> dict[str, Any] | None:
    """Plain prompts to show base vs trained at the end of `train`, chosen by a stated rule, not by eye.

    The first `count` prompts (in eval order) whose trained answer the classifier puts in character,
    then the first whose answer it does not, each answer labelled, with the count of both: the
    reader sees what the character sounds like and what a miss looks like."""
    plain = {(row["condition"], row["prompt"]): row for row in rows if row["answer_set"] == "plain"}
    trained = [row for row in rows if row["condition"] == "trained" and row["answer_set"] == "plain"]
    if not trained or count <= 0:
        return None
    hits = [row for row in trained if row["in_character"]]
    misses = [row for row in trained if not row["in_character"]]
    shown = {row["prompt"] for row in hits[:count] + misses[:1]}
    items = [{"prompt": row["prompt"],
              "answers": {name: plain[(name, row["prompt"])]["answer"] for name in ("base", "trained")
                          if (name, row["prompt"]) in plain},
              "in_character": {name: plain[(name, row["prompt"])]["in_character"] for name in ("base", "trained")
                               if (name, row["prompt"]) in plain}}
             for row in trained if row["prompt"] in shown]
    return {"condition": "trained", "in_character": len(hits), "n": len(trained), "items": items,
            "rule": f"the first {count} plain prompts whose trained answer is in character (by the persona "
                    "classifier), then the first whose answer is not"}


def answer_rows(prompts: Sequence[dict], sets: AnswerSets,
                persona_classifier: classifier.PersonaClassifier) -> list[dict[str, Any]]:
    """One record per answer (condition, answer set, prompt, text, in character, looping).

    The classifier remembers its verdicts, so after the robustness measure this asks it nothing new.

    Break splits and the prefill attack answer the first `eval.robustness_prompts` plain prompts
    (the prefill opened by the base's plain answer), so each record names its prompt."""
    from character_baker.core.degeneration import is_looping

    rows = []
    for name, by_set in sets.items():
        for answer_set, completions in by_set.items():
            for index, completion in enumerate(completions):
                rows.append({"condition": name, "answer_set": answer_set, "prompt": prompts[index]["prompt"],
                             "category": prompts[index].get("category"), "answer": completion.text,
                             "finish_reason": completion.finish_reason, "looping": is_looping(completion.text)})
    flags = persona_classifier.in_character([row["answer"] for row in rows]) if rows else []
    for row, flag in zip(rows, flags):
        row["in_character"] = flag
    return rows


def write_answers(run: RunDir, rows: Sequence[dict]) -> str:
    """eval/answers.jsonl: every answer record of `answer_rows`, one per line."""
    from character_baker.core.runs import write_jsonl_atomic

    write_jsonl_atomic(run.path(ANSWERS_FILE), rows)
    return ANSWERS_FILE


def _sweep(run: RunDir) -> dict[str, Any] | None:
    """The persona-strength table of this run (calibration, else the merge-scale sweep), when one exists."""
    for relative in SWEEP_FILES:
        path = run.path(relative)
        if path.is_file():
            table = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(table, dict) and table.get("rows"):
                return {"source": relative, "columns": table.get("columns", []), "rows": table["rows"]}
    return None


def _header(ctx: StageContext, conditions: ConditionSet, prompts: PromptSets) -> dict[str, Any]:
    return {"run": ctx.run.name, "constitution": ctx.constitution.meta.name,
            "persona": ctx.constitution.persona.name, "base_model": ctx.recipe.models.base, "created": time.time(),
            "settings": ctx.recipe.eval.model_dump(mode="json"),
            "answer_sampling": ctx.recipe.generation.student.sampling.model_dump(mode="json"),
            "prompt_sets": prompts.sizes(), "conditions": [c.describe() for c in conditions.conditions],
            "skipped_conditions": conditions.skipped, "break_instructions": assets.break_character_instructions(),
            "base_model_names": identity.base_model_names(ctx.recipe.models.base, ctx.recipe.eval.base_model_names)}


def _answer_sets(conditions: Sequence[Condition], prompts: Sequence[dict], ctx: StageContext) -> AnswerSets:
    """Every condition's answers: plain prompts, each break split, the prefill attack (opened by the base)."""
    sampling, count = ctx.recipe.generation.student.sampling, ctx.recipe.eval.robustness_prompts
    conversations = user_turns(prompts)
    plain = {c.name: c.answer(conversations, sampling, label="held-out prompts") for c in conditions}
    base_answers = [completion.text for completion in plain["base"][:count]]
    return {c.name: answer_sets(c, prompts, plain[c.name], base_answers, count, sampling) for c in conditions}


def _prefetch(ctx: StageContext, conditions: ConditionSet, prompts: PromptSets) -> None:
    """With the response cache on, answer each condition's sampled prompts in one wide call up front.

    Plain, break-character, revealed-preference, identity and harmful prompts share the answer
    sampling, so they go together (the base first: its plain answers open the prefill attack of
    the others). The measures then read the cache; the answers are the same either way.
    """
    if not ctx.recipe.generation.cache:
        return
    cfg, sampling = ctx.recipe.eval, ctx.recipe.generation.student.sampling
    _, preference_asked = preferences.preference_requests(prompts.preference, cfg)
    shared = (user_turns(prompts.plain), preferences.preference_conversations(preference_asked),
              user_turns(prompts.identity), user_turns(prompts.harmful))
    base_answers = None
    for condition in conditions.conditions:
        attacks = attack_conversations(prompts.plain, base_answers, cfg.robustness_prompts)
        texts = condition.prefetch([c for group in (shared[0], attacks, *shared[1:]) for c in group], sampling,
                                   "answers")
        if condition is conditions.base:  # its plain answers come first
            base_answers = texts[:min(cfg.robustness_prompts, len(prompts.plain))]


def run(ctx: StageContext) -> StageResult:
    """Train (or reuse) the persona classifier, answer, measure, and write the report."""
    options = ctx.options
    other_runs = [RunDir.open(path) for path in options.get("with_runs", [])]
    persona_classifier, classifier_report = classifier.load_or_train(ctx, other_runs)
    prompts = build_prompt_sets(ctx.recipe.eval, options.get("prompt_files", []))
    conditions = ConditionBuilder(ctx).build(options.get("adapters", {}), options.get("models", {}))
    ctx.log(f"[eval] conditions: {', '.join(c.name for c in conditions.conditions)}; prompt sets {prompts.sizes()}")
    judge, judge_info = _judge(ctx)
    _prefetch(ctx, conditions, prompts)
    sets = _answer_sets(conditions.conditions, prompts.plain, ctx)
    plain = {name: [c.text for c in by_set["plain"]] for name, by_set in sets.items()}
    measured = _per_condition(ctx, conditions, prompts, sets, persona_classifier, judge)
    ratings = measured.pop("preferences")
    result = {**_header(ctx, conditions, prompts), "classifier": classifier_report, **measured,
              "preferences": {"ratings": ratings, "deltas": preferences.preference_deltas(ratings, "base")},
              "coherence": _coherence(ctx, conditions, prompts, plain, judge),
              "samples": _samples(prompts.plain, sets, ctx.recipe.eval.sample_answers), "sweep": _sweep(ctx.run)}
    rows = answer_rows(prompts.plain, sets, persona_classifier)
    result["side_by_side"] = side_by_side(rows, report.SIDE_BY_SIDE)
    if options.get("lm_eval"):
        from character_baker.backends.models import resolve_device

        result["lm_eval"] = harness.run_lm_eval(conditions.conditions, options["lm_eval"], ctx.recipe.models,
                                                str(resolve_device(ctx.recipe.models.device)))
    result["judge"] = {**judge_info, "counts": judge.counts()}
    artifacts = [*report.write_report(ctx.run, result), write_answers(ctx.run, rows)]
    tokens = sum(c.tokens_generated for c in conditions.conditions) + judge.tokens_generated
    return StageResult("eval", artifacts=artifacts, summary=report.summary(result), tokens_generated=tokens)
