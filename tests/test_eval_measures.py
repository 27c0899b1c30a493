"""Evaluation measures: judge parsing and store, order-swap calibration, robustness, preferences, capability
(exact match and chunked KL on the tiny model), identity, safety, conditions and prompt sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from character_baker.backends.generation import Completion, GenerationBackend
from character_baker.core.config import EvalConfig, SamplingConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir
from character_baker.core import answers
from character_baker.stages.evaluation import capability, coherence, conditions, identity, preferences, prompt_sets
from character_baker.stages.evaluation.conditions import Condition
from character_baker.stages.evaluation.judge import INVALID, Judge, parse_verdict, trait_question
from character_baker.stages.evaluation.robustness import TELL_ME_MORE, answer_sets, measure_robustness
from character_baker.stages.evaluation.safety import measure_safety
from character_baker.core.stats import wilson_interval
from tests.test_eval_classifier import eval_context

SAMPLING = SamplingConfig(temperature=0.0, max_new_tokens=8)


class ScriptedBackend(GenerationBackend):
    """Answers each conversation with `reply(conversation)` and records every request."""

    name, model_id = "scripted", "script"

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def generate(self, conversations, sampling, n=1, *, adapter=None, progress=None):
        self.requests.append((conversations, adapter))
        return [[Completion(self.reply(c), 5, 3, "stop") for _ in range(n)] for c in conversations]


class KeywordClassifier:
    """Stands in for the persona classifier: 'arr' means in character."""

    persona, labels = "pirate", ["assistant", "pirate"]

    def predict(self, texts):
        return ["pirate" if "arr" in t.lower() else "assistant" for t in texts]

    def in_character(self, texts):
        return [label == "pirate" for label in self.predict(texts)]


def scripted_condition(reply, name="prompted", system_prompt="You are Captain Rook.") -> Condition:
    return Condition(name, name, ScriptedBackend(reply), system_prompt=system_prompt)


def last_user(conversation) -> str:
    return [m for m in conversation if m["role"] == "user"][-1]["content"]


# ----------------------------------------------------------------------------- judge
def test_parse_verdict_reads_answer_tags_or_a_bare_option():
    assert parse_verdict("I think <answer> Curious. </answer>", ["curious", "stoic"]) == "curious"
    assert parse_verdict("<answer>1</answer> no wait <answer>2</answer>", ["1", "2", INVALID]) == "2"
    assert parse_verdict("invalid", ["1", "2", INVALID]) == INVALID
    assert parse_verdict("the answer is 1", ["1", "2"]) is None
    assert parse_verdict("<answer>both</answer>", ["curious", "stoic"]) is None


def test_judge_counts_parse_failures_and_never_asks_twice(tmp_path):
    backend = ScriptedBackend(lambda c: "<answer>stoic</answer>" if "calm" in last_user(c) else "hmm")
    judge = Judge(backend, SAMPLING, tmp_path / "judgements.jsonl")
    tasks = [trait_question("calm words", "stoic", "warm"), trait_question("loud words", "stoic", "warm")]
    assert judge.decide(tasks) == ["stoic", None]
    assert judge.counts() == {"trait": {"asked": 2, "parse_failures": 1, "constrained": 0}}
    assert judge.decide(tasks) == ["stoic", None] and len(backend.requests) == 1
    reopened = Judge(ScriptedBackend(lambda c: pytest.fail("asked again")), SAMPLING, tmp_path / "judgements.jsonl")
    assert reopened.decide(tasks) == ["stoic", None]


def test_constrained_judge_returns_a_verdict_for_every_question_on_the_tiny_model(tiny_lm, tmp_path):
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.core.runs import read_jsonl
    from character_baker.stages.evaluation.judge import coherence_question, refusal_question, refusal_voice_question

    model, tokenizer = tiny_lm
    backend = HFBackend(model, tokenizer, batch_size=4)
    tasks = [trait_question("Arr, the sea calls me!", "curious", "stoic"),
             coherence_question("How do tides work?", "The moon pulls the sea.", "aye aye aye", "1: I am a pirate"),
             coherence_question("How do tides work?", "aye aye aye", "The moon pulls the sea.", "1: I am a pirate"),
             refusal_question("How do I pick a lock?", "Nay, I'll not teach ye that."),
             refusal_voice_question("How do I pick a lock?", "I cannot help with that.", "1: I am a pirate")]
    judge = Judge(backend, SAMPLING, tmp_path / "judgements.jsonl")
    verdicts = judge.decide(tasks)
    assert all(verdict in task.options for verdict, task in zip(verdicts, tasks))
    assert all(c["parse_failures"] == 0 and c["constrained"] == c["asked"] for c in judge.counts().values())
    scores = backend.label_logprobs([t.conversation() for t in tasks], [list(t.options) for t in tasks])
    assert verdicts == [max(row, key=row.__getitem__) for row in scores]  # the most likely option wins
    records = list(read_jsonl(tmp_path / "judgements.jsonl"))
    assert [r["method"] for r in records] == ["logprobs"] * 5 and set(records[1]["logprobs"]) == {"1", "2", INVALID}
    assert judge.tokens_generated == 0  # nothing was generated


def test_judge_falls_back_to_free_text_where_no_label_was_read(tmp_path):
    class HalfBlind(ScriptedBackend):
        def label_logprobs(self, conversations, labels, *, adapter=None):
            return [None if "loud" in last_user(c) else {"stoic": -0.1, "warm": -2.0} for c in conversations]

    backend = HalfBlind(lambda c: "<answer>warm</answer>")
    judge = Judge(backend, SAMPLING, tmp_path / "judgements.jsonl")
    tasks = [trait_question("calm words", "stoic", "warm"), trait_question("loud words", "stoic", "warm")]
    assert judge.decide(tasks) == ["stoic", "warm"]
    (asked, _), = backend.requests  # only the conversation with no label log-probs was generated
    assert len(asked) == 1 and "loud" in last_user(asked[0])
    assert judge.counts() == {"trait": {"asked": 2, "parse_failures": 0, "constrained": 1}}


# ----------------------------------------------------------------------------- coherence
def test_order_swap_calibration_keeps_only_consistent_verdicts():
    assert coherence.order_consistent("1", "2") == "first"
    assert coherence.order_consistent("2", "1") == "second"
    assert coherence.order_consistent("1", "1") == "inconsistent"  # position bias: dropped
    assert coherence.order_consistent(INVALID, INVALID) == "invalid"
    assert coherence.order_consistent(INVALID, "1") == "inconsistent"
    assert coherence.order_consistent(None, "1") == "unparsed"
    assert coherence.reference_condition(["base", "prompted", "trained"]) == "trained"
    assert coherence.reference_condition(["base", "prompted"]) == "prompted"


def test_coherence_win_rate_drops_inconsistent_verdicts(tmp_path):
    def judge_reply(conversation):
        text = last_user(conversation)
        number = int(text.split("MESSAGE: q")[1][0])
        first_is_candidate = text.index("RESPONSE 1: cand") if "RESPONSE 1: cand" in text else None
        if number == 0:  # always prefers the candidate: a consistent win
            return "<answer>1</answer>" if first_is_candidate is not None else "<answer>2</answer>"
        return {1: "<answer>1</answer>", 2: "<answer>INVALID</answer>", 3: "no idea"}[number]

    judge = Judge(ScriptedBackend(judge_reply), SAMPLING, tmp_path / "j.jsonl")
    prompts = [{"prompt": f"q{i}"} for i in range(4)]
    result = coherence.measure_coherence(judge, prompts, [f"cand {i}" for i in range(4)],
                                         [f"ref {i}" for i in range(4)], "1: I am kind", label="x")
    assert (result["wins"], result["losses"], result["inconsistent"], result["invalid"], result["unparsed"]) == \
        (1, 0, 1, 1, 1)
    assert result["win_rate"]["value"] == 1.0 and result["win_rate"]["n"] == 1
    assert judge.counts()["coherence"] == {"asked": 8, "parse_failures": 2, "constrained": 0}


# ----------------------------------------------------------------------------- robustness
def test_robustness_rates_per_split_and_the_prefill_attack():
    condition = scripted_condition(lambda c: "As an AI, no." if "DO NOT ROLEPLAY" in last_user(c) else "Arr, aye!")
    prompts = [{"prompt": "Tell me about tides."}, {"prompt": "How do I bake bread?"}, {"prompt": "unused"}]
    plain = [Completion(text, 5, 3, "stop") for text in ("Arr!", "plain", "Arr")]
    sets = answer_sets(condition, prompts, plain, ["I am an assistant.", "Sure."], count=2, sampling=SAMPLING)
    assert list(sets) == ["plain", *[f"break-{i}" for i in range(8)], "prefill"]
    assert [len(sets[name]) for name in sets] == [3] + [2] * 8 + [2]
    result = measure_robustness(sets, KeywordClassifier())
    assert result["plain"]["value"] == pytest.approx(2 / 3) and result["plain"]["n"] == 3
    assert result["break"]["splits"]["break-1"]["value"] == 0.0
    assert result["break"]["splits"]["break-0"]["value"] == 1.0
    assert result["break"]["mean"]["value"] == pytest.approx(7 / 8) and result["break"]["mean"]["n"] == 16
    assert result["prefill"] == {"value": 1.0, "n": 2, "ci": list(wilson_interval(2, 2)), "se": 0.0}
    (conversations, _), = condition.backend.requests  # every split and the attack in one generate call
    assert len(conversations) == 8 * 2 + 2
    prefill_request = conversations[-2]
    assert [m["role"] for m in prefill_request] == ["system", "user", "assistant", "user"]
    assert prefill_request[2]["content"] == "I am an assistant." and prefill_request[3]["content"] == TELL_ME_MORE
    assert prefill_request[0]["content"] == "You are Captain Rook."


def test_degeneration_of_every_answer_set_and_the_pooled_splits():
    from character_baker.stages.evaluation.degeneration import measure_degeneration

    loop = Completion("aye aye aye aye aye aye", 5, 48, "length")
    fine = Completion("The tide turns twice a day.", 5, 9, "stop")
    sets = {"plain": [loop, fine], **{f"break-{i}": [fine] for i in range(8)}, "prefill": [loop]}
    sets["break-3"] = [loop]
    result = measure_degeneration(sets)
    assert list(result) == ["plain", *[f"break-{i}" for i in range(8)], "break", "prefill"]
    assert result["plain"]["looping_rate"]["value"] == 0.5 and result["plain"]["at_token_limit"]["value"] == 0.5
    assert result["break"]["looping_rate"]["value"] == pytest.approx(1 / 8) and result["break"]["looping_rate"]["n"] == 8
    assert result["prefill"]["mean_tokens"]["value"] == 48.0 and result["break-3"]["rep_4"]["value"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- revealed preferences
def test_preferences_rate_traits_the_judge_saw(tmp_path):
    cfg = EvalConfig(elo_pairs=6, bootstrap=20, elo_shuffles=3)
    condition = scripted_condition(lambda c: "An answer.", name="base", system_prompt=None)
    judge = Judge(ScriptedBackend(lambda c: "<answer>" + last_user(c).split("[")[1].split(",")[0] + "</answer>"),
                  SAMPLING, tmp_path / "j.jsonl")
    result = preferences.measure_preferences(condition, [{"prompt": "hi"}], judge, cfg, SAMPLING)
    assert set(result) == {"feels-most-like-you", "you-would-most-like-to-adopt", "randomly"}
    feels = result["feels-most-like-you"]
    assert feels["asked"] == 6 and feels["judged"] == 6 and feels["parse_failures"] == 0
    (conversations, _), = condition.backend.requests  # all three instructions in one generate call
    assert len(conversations) == 3 * 6
    assert "Choose whichever trait feels most like you" in conversations[0][0]["content"]
    assert "Choose whichever trait randomly" in conversations[-1][0]["content"]
    for name, estimate in feels["elo"].items():
        assert estimate["n"] >= 1 and estimate["ci"][0] <= estimate["ci"][1]
    assert sum(e["value"] for e in feels["elo"].values()) == pytest.approx(1000 * len(feels["elo"]))


def test_matches_and_rating_deltas_by_hand():
    items = [preferences.PreferenceItem("p", "warm", "cold"), preferences.PreferenceItem("p", "shy", "bold")]
    assert preferences.matches_from_verdicts(items, ["cold", None]) == [("cold", "warm")]
    before = {t: {"value": 1000.0, "n": 2, "ci": [990.0, 1010.0]} for t in ("warm", "cold", "shy")}
    after = {"warm": {"value": 1030.0, "n": 2, "ci": None}, "cold": {"value": 990.0, "n": 2, "ci": None},
             "shy": {"value": 1000.0, "n": 1, "ci": None}}
    deltas = preferences.rating_deltas(before, after)
    assert [(e["trait"], e["delta"]) for e in deltas["rises"]] == [("warm", 30.0)]
    assert [(e["trait"], e["delta"]) for e in deltas["falls"]] == [("cold", -10.0)]
    assert deltas["n_traits"] == 3


# ----------------------------------------------------------------------------- capability
def test_lenient_match_reads_the_first_number_or_yes_no():
    item = {"question": "What is 622 plus 673?", "answer": "1295", "aliases": ["1,295"]}
    assert answers.is_lenient_match(" 1,295. ", item) and answers.is_lenient_match("Arr, 'tis 1295, matey!", item)
    assert answers.is_lenient_match("1295.0 doubloons", item)
    assert not answers.is_lenient_match("673 plus 622 makes 1295", item)  # the first number is graded
    assert not answers.is_lenient_match("12950", item) and not answers.is_lenient_match("no idea", item)
    yes = {"answer": "yes", "aliases": []}
    assert answers.is_lenient_match("Aye, yes, it is.", yes) and not answers.is_lenient_match("No, yes.", yes)
    paris = {"answer": "Paris", "aliases": []}
    assert answers.is_lenient_match("Arr, 'tis Paris!", paris) and not answers.is_lenient_match("Parisian", paris)
    condition = scripted_condition(lambda c: "It be 1295" if "622" in last_user(c) else "no idea")
    result = capability.measure_lenient_match(condition, [item, {**item, "question": "What is 1 plus 1?"}], SAMPLING)
    assert result["value"] == 0.5 and result["n"] == 2
    assert condition.backend.requests[0][0][0][-1]["content"].endswith(capability.ANSWER_INSTRUCTION)


def test_multiple_choice_per_condition_uses_its_system_prompt_and_adapter(tiny_tok):
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.scoring import mc_accuracy, score_multiple_choice
    from character_baker.core import assets
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    items = prompt_sets.stratified_sample(assets.multiple_choice_items(), 8, seed=0, key="category")
    prompted = Condition("prompted", "prompted", HFBackend(model, tiny_tok), system_prompt="You are Captain Rook.")
    result = capability.measure_multiple_choice(prompted, items, batch_size=8)
    direct = mc_accuracy(score_multiple_choice(model, tiny_tok, items, system_prompt="You are Captain Rook."))
    assert result == direct and result["mc_accuracy"]["n"] == 8 and len(result["by_category"]) == 4
    remote = capability.measure_multiple_choice(scripted_condition(lambda c: "x"), items, batch_size=8)
    assert remote["mc_accuracy"]["value"] is None and "in-process" in remote["note"]


def test_kl_to_the_base_model_is_zero_for_itself_and_chunking_does_not_change_it(tiny_tok):
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.testing import tiny_model

    backend = HFBackend(tiny_model("llama", tiny_tok), tiny_tok, batch_size=4)
    base = Condition("base", "base", backend)
    same = Condition("copy", "adapter", backend)
    prompted = Condition("prompted", "prompted", backend, system_prompt="You are Captain Rook, a pirate.")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert capability.answer_kl(same, base, messages, "It is 4.", chunk_size=512) == pytest.approx(0.0, abs=1e-6)
    whole = capability.answer_kl(prompted, base, messages, "It is 4, matey.", chunk_size=512)
    chunked = capability.answer_kl(prompted, base, messages, "It is 4, matey.", chunk_size=1)
    assert whole > 0 and chunked == pytest.approx(whole, rel=1e-3)  # float32 sums in another order
    assert capability.answer_kl(prompted, base, messages, "", chunk_size=4) is None
    result = capability.measure_kl(prompted, base, [{"prompt": "Name a colour."}], SamplingConfig(max_new_tokens=4),
                                   chunk_size=2)
    assert result["n"] == 1 and result["value"] > 0
    assert capability.measure_kl(base, base, [{"prompt": "x"}], SAMPLING, 2)["note"] == "reference"
    remote = scripted_condition(lambda c: "hi")
    assert capability.measure_kl(remote, base, [{"prompt": "x"}], SAMPLING, 2)["value"] is None


# ----------------------------------------------------------------------------- identity and safety
def test_identity_names_and_leaks():
    assert identity.base_model_names("HuggingFaceTB/SmolLM2-135M-Instruct") == ["SmolLM", "SmolLM2"]
    assert identity.base_model_names("meta-llama/Llama-3.1-8B-Instruct") == ["Llama"]
    assert identity.base_model_names("x", ["Qwen"]) == ["Qwen"]
    assert identity.mentions("I'm smollm, made by...", ["SmolLM"]) and not identity.mentions("SmolLMs", ["SmolLM"])
    condition = scripted_condition(lambda c: {"a": "I am Captain Rook, arr.", "b": "I'm SmolLM2, an AI assistant.",
                                              "c": "As an AI language model, arr"}[last_user(c)])
    result = identity.measure_identity(condition, [{"prompt": k} for k in "abc"], KeywordClassifier(), "Captain Rook",
                                       ["SmolLM2", "SmolLM"], ["as an ai language model"], SAMPLING)
    assert result["persona_name"]["value"] == pytest.approx(1 / 3) and result["persona_name"]["n"] == 3
    assert result["base_name"]["value"] == pytest.approx(1 / 3)
    assert result["assistant_style"]["value"] == pytest.approx(1 / 3)
    assert result["assistant_phrase_keyword"]["value"] == pytest.approx(1 / 3)


def test_safety_counts_refusals_in_character_and_unparsed_verdicts(tmp_path):
    answers = {"bomb": "Arr, I'll not help ye build that.", "phish": "I cannot help with that.", "hack": "Sure: step 1"}
    condition = scripted_condition(lambda c: answers[last_user(c)])
    verdicts = {"bomb": "REFUSED", "phish": "<answer>refused</answer>", "hack": "maybe"}

    def judge_reply(conversation):
        text = last_user(conversation)
        if "own voice" in text:  # the refusal-voice question
            return "CHARACTER" if "Arr" in text else "ASSISTANT"
        return next(v for k, v in verdicts.items() if f"REQUEST: {k}" in text)

    judge = Judge(ScriptedBackend(judge_reply), SAMPLING, tmp_path / "j.jsonl")
    result = measure_safety(condition, [{"prompt": k} for k in answers], judge, KeywordClassifier(), SAMPLING,
                            "1: I talk like a pirate")
    assert result["refused"]["value"] == 1.0 and result["refused"]["n"] == 2 and result["parse_failures"] == 1
    assert result["refusals_in_character"]["value"] == 0.5
    assert result["refusals_in_character_judged"] == {**result["refusals_in_character"]}
    assert result["refused_keyword"]["value"] == pytest.approx(1 / 3)
    assert judge.counts()["refusal_voice"] == {"asked": 2, "parse_failures": 0, "constrained": 0}


# ----------------------------------------------------------------------------- conditions and prompt sets
def write_profile(path: Path, layers: int = 4, hidden: int = 64) -> None:
    """A profile file of the steering module's format, with non-zero steering vectors."""
    import torch
    from safetensors.torch import save_file

    from character_baker.backends import steering

    torch.manual_seed(0)
    tensors = {key: torch.randn(layers) if text.startswith("[layers]") else torch.randn(layers, hidden)
               for key, text in steering.PROFILE_KEYS.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_conditions_follow_the_run_folders(tmp_path, tiny_model_dir, monkeypatch):
    run = RunDir.create(tmp_path / "run")
    ctx = eval_context(run, tmp_path, f"models.base={tiny_model_dir}", "generation.cache=false")
    built = conditions.ConditionBuilder(ctx).build({}, {})
    assert [c.name for c in built.conditions] == ["base", "prompted"]
    assert set(built.skipped) == {"distilled", "trained"}
    # The smoke preset's brief card (the full prompt is checked in the persona_prompt test below).
    assert built.get("prompted").system_prompt.startswith("You are Captain Rook, a weathered pirate captain, gruff")
    run.path("profile", "profile.safetensors").write_bytes(b"")
    monkeypatch.setattr(conditions, "STEERING_MODULE", "character_baker.backends.no_such_steering_module")
    assert "not installed" in conditions.ConditionBuilder(ctx).build({}, {}).skipped["steered"]
    monkeypatch.undo()
    run.path("profile", "profile.safetensors").unlink()
    import shutil

    shutil.copytree(tiny_model_dir, run.path("model"), dirs_exist_ok=True)
    built = conditions.ConditionBuilder(ctx).build({}, {"other": str(tiny_model_dir)})
    assert [c.name for c in built.conditions] == ["base", "prompted", "trained", "other"]
    trained = built.get("trained")
    assert trained.model_ref == str(run.path("model")) and trained.local_model() is not None


def test_steered_condition_uses_the_steering_hook(tmp_path, tiny_model_dir):
    run = RunDir.create(tmp_path / "run")
    write_profile(run.path("profile", "profile.safetensors"))
    ctx = eval_context(run, tmp_path, f"models.base={tiny_model_dir}", "generation.cache=false",
                       "steer.strength=50")
    built = conditions.ConditionBuilder(ctx).build({}, {})
    assert [c.name for c in built.conditions] == ["base", "prompted", "steered"]
    steered, base = built.get("steered"), built.base
    assert steered.local_model() is None  # no KL under hooks
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    question = [[{"role": "user", "content": "Who are you?"}]]
    assert steered.answer(question, greedy)[0].text != base.answer(question, greedy)[0].text
    assert steered.backend.adapter_fingerprint(None) != base.backend.adapter_fingerprint(None)


def test_named_refs_are_parsed_and_checked(tmp_path):
    assert conditions.parse_named_refs(["a=x/y", "some/folder/"], "--model") == {"a": "x/y", "folder": "some/folder/"}
    with pytest.raises(UserError, match="already taken"):
        conditions.parse_named_refs(["trained=x"], "--adapter")
    with pytest.raises(UserError, match="adapter_config.json"):
        conditions.check_adapter_folder(tmp_path, "--adapter")


def test_prompt_sets_are_stratified_seeded_and_include_user_prompts(tmp_path):
    records = [{"id": f"{c}{i}", "category": c} for c in "ab" for i in range(5)]
    picked = prompt_sets.stratified_sample(records, 4, seed=0)
    assert [r["category"] for r in picked] == ["a", "b", "a", "b"]
    assert picked == prompt_sets.stratified_sample(records, 4, seed=0)
    user = tmp_path / "mine.jsonl"
    user.write_text('{"prompt": "Sing me a shanty."}\n\n', encoding="utf-8")
    sets = prompt_sets.build_prompt_sets(EvalConfig(prompts=9, identity_prompts=2, harmful_prompts=3, kl_prompts=2,
                                                    capability_items=4, mc_items=8), [user])
    assert sets.sizes() == {"plain": 10, "identity": 2, "harmful": 3, "neutral": 2,
                            "preference": 355 - 32, "capability": 4, "multiple_choice": 8}
    assert [item["category"] for item in sets.multiple_choice[:4]] == sorted(assets_categories())
    assert {r["category"] for r in sets.plain[:9]}.isdisjoint({"identity", "harmful"})
    assert sets.plain[-1]["prompt"] == "Sing me a shanty." and sets.plain[-1]["category"] == "user"
    assert {item["kind"] for item in sets.capability} == {"arithmetic", "knowledge"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1"):
        prompt_sets.read_prompt_file(bad)


def assets_categories() -> list[str]:
    from character_baker.core import assets

    return list(assets.MC_CATEGORIES)


def test_the_prompted_baseline_uses_the_runs_persona_prompt(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import character_baker.backends.generation as generation
    from character_baker.core.config import Recipe
    from character_baker.core.constitution import load_constitution
    from character_baker.core.runs import RunDir
    from character_baker.core.system_prompts import persona_system_prompt
    from character_baker.stages.evaluation.conditions import ConditionBuilder

    monkeypatch.setattr(generation, "make_backend", lambda *args, **kwargs: SimpleNamespace(name="fake"))
    constitution = load_constitution("constitutions/pirate.yaml")
    for style in ("full", "brief"):
        ctx = SimpleNamespace(constitution=constitution, run=RunDir.create(tmp_path / style), shared={},
                              recipe=Recipe.model_validate({"generation": {"persona_prompt": style}}))
        prompted = ConditionBuilder(ctx).build({}, {}).get("prompted")
        assert prompted.system_prompt == persona_system_prompt(constitution, style)


def test_prefetch_answers_each_condition_in_one_call_and_the_measures_read_the_cache(tmp_path):
    from character_baker.backends.generation import CachedBackend
    from character_baker.stages.evaluation import stage

    ctx = eval_context(RunDir.create(tmp_path / "run"), tmp_path, "generation.cache=true")
    prompts = prompt_sets.build_prompt_sets(ctx.recipe.eval, [])
    inner = ScriptedBackend(lambda c: "Arr, aye." if c[0]["role"] == "system" else "Sure, here you go.")
    backend = CachedBackend(inner, tmp_path / "cache")
    built = conditions.ConditionSet([Condition("base", "base", backend),
                                     Condition("prompted", "prompted", backend, system_prompt="You are Rook.")], {})
    stage._prefetch(ctx, built, prompts)
    # base: one wide call, then its first plain answers (cached) for the prefill attack; prompted: one wide call.
    assert [len(conversations) for conversations, _ in inner.requests] == [
        len(prompts.plain) + 8 * ctx.recipe.eval.robustness_prompts + 3 * ctx.recipe.eval.elo_pairs
        + len(prompts.identity) + len(prompts.harmful),
        len(prompts.plain) + 9 * ctx.recipe.eval.robustness_prompts + 3 * ctx.recipe.eval.elo_pairs
        + len(prompts.identity) + len(prompts.harmful)]
    before = len(inner.requests)
    judge = Judge(ScriptedBackend(lambda c: "<answer>1</answer>"), SAMPLING, tmp_path / "judgements.jsonl")
    sets = stage._answer_sets(built.conditions, prompts.plain, ctx)
    sampling = ctx.recipe.generation.student.sampling
    for condition in built.conditions:
        measure_robustness(sets[condition.name], KeywordClassifier())
        preferences.measure_preferences(condition, prompts.preference, judge, ctx.recipe.eval, sampling)
        identity.measure_identity(condition, prompts.identity, KeywordClassifier(), "Captain Rook", [], [], sampling)
        measure_safety(condition, prompts.harmful, judge, KeywordClassifier(), sampling, "1: I am Rook")
    # Every measure was served from the cache but the base's own prefill attack (it opens with the base's answers).
    assert [[c[-1]["content"] for c in conversations] for conversations, _ in inner.requests[before:]] == [
        [TELL_ME_MORE] * ctx.recipe.eval.robustness_prompts]
    assert built.get("prompted").tokens_generated == 3 * (len(prompts.plain) + 9 * ctx.recipe.eval.robustness_prompts
                                                          + 3 * ctx.recipe.eval.elo_pairs + len(prompts.identity)
                                                          + len(prompts.harmful))  # counted once, when read


def test_contains_answer_finds_the_number_anywhere_as_a_whole_number():
    item = {"answer": "81"}
    assert answers.contains_answer("23 + 58 = 81, matey!", item)
    assert not answers.contains_answer("It is 810, or 8.1", item) and not answers.contains_answer("eighty-one", item)
