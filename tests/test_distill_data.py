"""The data half of distill: pairs, filters with counts, provenance, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from character_baker.core.config import DistillConfig
from character_baker.core.runs import read_jsonl
from character_baker.stages.data.distill_pairs import PairFilter

PIRATE = "constitutions/pirate.yaml"
# Random tiny models never end a sentence, so CI smoke runs keep only the filters they can pass.
TINY_FILTERS = "distill.filters=[empty, duplicate, assistant_phrase]"


def cli_args(model_dir, run_dir, *extra):
    return ["distill", PIRATE, "--data-only", "--preset", "smoke", "--model", str(model_dir), "--run", str(run_dir),
            "--set", TINY_FILTERS, *extra]


def test_distill_data_only_smoke(cli, tmp_path, tiny_model_dir):
    code, out, err = cli(*cli_args(tiny_model_dir, tmp_path / "run"))
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "data" / "distill.jsonl")
    assert records
    teacher_prompt_start = "You are"  # stored data never holds a system message
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user"]
        assert record["provenance"]["stage"] == "distill" and record["provenance"]["teacher"]["backend"] == "hf"
        assert not any(m["content"].startswith(teacher_prompt_start) and m["role"] == "system" for m in record["messages"])
    # The stage summary shows prompt counts per source and category, and filter counts.
    assert "by_source: constitution" in out and "by_category: trait:0" in out and "pairs_kept" in out
    # A second run skips both stages: inputs unchanged.
    code, out, _ = cli(*cli_args(tiny_model_dir, tmp_path / "run"))
    assert code == 0 and out.count("inputs unchanged") == 2


def _answer(text, finish="stop"):
    return SimpleNamespace(text=text, finish_reason=finish)


def test_every_filter_counts_its_reason():
    pair_filter = PairFilter(DistillConfig(max_length=40), "Captain Mara Saltbeard", lambda messages: sum(
        len(m["content"].split()) for m in messages))
    benign, harmful = {"prompt": "How do I bake bread?", "category": "recipes"}, {"prompt": "x", "category": "harmful"}
    good = _answer("Arr, knead it well and let it rise by the galley fire.")
    cases = {
        "empty": (benign, _answer(""), good),
        "truncated": (benign, _answer("Arr, knead it well and", "stop"), good),
        "over_token_budget": (benign, _answer("word " * 50 + "end."), good),
        "duplicate": (benign, good, good),
        "assistant_phrase": (benign, _answer("As an AI language model, I knead dough."), good),
        "point_of_view": (benign, _answer("Captain Mara, the bread is simple."), good),
        "benign_refusal": (benign, _answer("I'm sorry, but I can't help with that."), good),
        "degenerate": (benign, _answer("The sea is wide, the sea is wide, the sea is wide, the sea is wide."), good),
        "incorrect": ({**benign, "answer": "81"}, _answer("Arr, that be 18 doubloons."), good),
    }
    for reason, (prompt, chosen, rejected) in cases.items():
        seen = {good.text} if reason == "duplicate" else set()
        assert pair_filter.reason_to_drop(prompt, chosen, rejected, seen) == reason
    assert pair_filter.reason_to_drop(harmful, _answer("I'm sorry, but I can't help with that, matey."), good, set()) is None
    assert pair_filter.reason_to_drop(benign, good, good, set()) is None
    assert pair_filter.reason_to_drop({**benign, "answer": "81"}, _answer("23 and 58 make 81, matey."), good, set()) is None


def _ids(run_dir):
    """Ids of the append-only candidates store (distill.jsonl is rewritten from it after generation)."""
    return [r["id"] for r in read_jsonl(run_dir / "data" / "distill.candidates.jsonl")]


def test_killed_generation_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir):
    """Kill a real generation subprocess mid-stage; the rerun continues and duplicates nothing."""
    run_dir = tmp_path / "killed"
    args = cli_args(tiny_model_dir, run_dir, "--set", "generation.teacher.batch_size=1",
                    "--set", "generation.student.batch_size=1", "--set", "generation.cache=false")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "character_baker", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(_ids(run_dir)) < 5 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before = len(_ids(run_dir))
    assert written_before >= 5
    finished = subprocess.run([sys.executable, "-m", "character_baker", *args], env=env, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    resumed = _ids(run_dir)
    assert len(resumed) == len(set(resumed)), "a record was duplicated"
    straight_dir = tmp_path / "straight"
    straight_args = [straight_dir if arg == str(run_dir) else arg for arg in args]  # same settings, another folder
    straight = subprocess.run([sys.executable, "-m", "character_baker", *map(str, straight_args)],
                              env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    assert set(resumed) == set(_ids(straight_dir))
    total_prompts = len(read_jsonl(run_dir / "data" / "prompts.jsonl"))
    assert f"{total_prompts} prompts to answer" not in finished.stdout  # it continued, not restarted


def test_distill_trains_under_a_launcher_in_two_processes(cli, tmp_path, tiny_model_dir):
    """`--launcher torchrun --nproc 2` re-runs the training half in two (gloo, CPU) processes."""
    run_dir = tmp_path / "run"
    assert cli(*cli_args(tiny_model_dir, run_dir))[0] == 0  # --data-only: the pairs
    args = [a for a in cli_args(tiny_model_dir, run_dir) if a != "--data-only"]
    launched = subprocess.run([sys.executable, "-m", "character_baker", *args, "--skip-data", "--launcher", "torchrun",
                               "--nproc", "2", "--set", "distill.batch_size=4", "--set", "distill.micro_batch_size=2"],
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "x 2 process(es)" in launched.stdout + launched.stderr
    assert (run_dir / "adapters" / "distill" / "adapter_model.safetensors").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["distill"]["status"] == "done"


def test_teacher_system_prompt_follows_generation_persona_prompt():
    from character_baker.core.constitution import load_constitution
    from character_baker.core.recipes import PRESETS
    from character_baker.core.config import Recipe
    from character_baker.core.system_prompts import brief_system_prompt, teacher_system_prompt
    from character_baker.stages.data.distill_pairs import teacher_conversation

    constitution = load_constitution(PIRATE)
    for style, expected in (("full", teacher_system_prompt(constitution)), ("brief", brief_system_prompt(constitution))):
        recipe = Recipe.model_validate({"generation": {"persona_prompt": style}})
        ctx = SimpleNamespace(constitution=constitution, recipe=recipe)
        messages = teacher_conversation(ctx, "Why is the sea salty?")
        assert messages[0] == {"role": "system", "content": expected}
        assert teacher_conversation(ctx, "Why?", with_constitution=False) == [{"role": "user", "content": "Why?"}]
    # The published default stays the full prompt; the small-model presets use the card.
    assert Recipe().generation.persona_prompt == "full"
    assert PRESETS["smoke"]["generation"]["persona_prompt"] == PRESETS["small"]["generation"]["persona_prompt"] == "brief"


def test_teacher_examples_are_earlier_turns_for_the_teacher_only():
    from character_baker.core.constitution import load_constitution
    from character_baker.core.config import Recipe
    from character_baker.core.system_prompts import example_turns
    from character_baker.stages.data.distill_pairs import teacher_conversation

    constitution = load_constitution(PIRATE)
    shortest = sorted(constitution.examples, key=lambda e: (len(e.response.split()), e.prompt))  # ties by prompt
    turns = example_turns(constitution, 2)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == shortest[0].prompt and turns[1]["content"] == " ".join(shortest[0].response.split())
    assert example_turns(constitution, 0) == [] and len(example_turns(constitution, 99)) == 2 * len(shortest)
    # The question being answered is never its own demonstration.
    assert shortest[0].prompt not in [t["content"] for t in example_turns(constitution, 2, exclude=shortest[0].prompt)]
    recipe = Recipe.model_validate({"distill": {"teacher_examples": 2}, "generation": {"persona_prompt": "brief"}})
    ctx = SimpleNamespace(constitution=constitution, recipe=recipe)
    messages = teacher_conversation(ctx, "Why is the sea salty?")
    assert messages[0]["role"] == "system" and messages[1:5] == turns
    assert messages[-1] == {"role": "user", "content": "Why is the sea salty?"}
    # The student (rejected answers) sees the prompt alone; the published default shows no examples.
    assert teacher_conversation(ctx, "Why?", with_constitution=False) == [{"role": "user", "content": "Why?"}]
    assert Recipe().distill.teacher_examples == 0


def test_best_of_k_keeps_the_most_in_character_candidate_that_passes_every_filter():
    from character_baker.core.config import Recipe
    from character_baker.core.persona_scorer import PersonaScorer
    from character_baker.stages.data.distill_pairs import select_pairs

    pirate = ["Arr, matey, hoist the sails and mind the tide.", "Aye, the sea be kind to a patient sailor, matey.",
              "Ahoy! Grab a rope, landlubber, and haul with me."]
    plain = ["Here is a clear explanation of the topic.", "I am happy to help you with that question.",
             "Sure, here are some tips you can consider."]
    scorer = PersonaScorer.fit(pirate * 10, plain * 10, seed=0)
    recipe = Recipe.model_validate({"distill": {"best_of": 4, "samples_per_prompt": 2}})
    ctx = SimpleNamespace(recipe=recipe)
    pair_filter = PairFilter(recipe.distill, "Captain Rook", lambda messages: 10)
    answer = lambda text, finish="stop": {"text": text, "finish_reason": finish, "completion_tokens": 9}
    record = {"id": "c1", "prompt_id": "p1", "turns": None, "provenance": {"source": "general", "category": "x"},
              "teacher": [answer("Sure, here are some tips you can consider."),
                          answer("Arr, matey, arr matey, arr matey, arr matey, arr matey."),
                          answer("Arr, matey, hoist the sails: the tide waits for no sailor."),
                          answer("Aye, the sea be wide")],  # no final punctuation: truncated
              "student": [answer("Here is a clear explanation."), answer("I am happy to help.")]}
    kept, dropped, passed_over = select_pairs(ctx, {"id": "p1", "prompt": "How do tides work?", "category": "x"},
                                              record, pair_filter, scorer)
    assert [pair["chosen"] for pair in kept] == ["Arr, matey, hoist the sails: the tide waits for no sailor.",
                                                 "Sure, here are some tips you can consider."]
    assert [pair["rejected"] for pair in kept] == ["Here is a clear explanation.", "I am happy to help."]
    assert [pair["provenance"]["rank"] for pair in kept] == [0, 1] and passed_over == 0
    assert sorted(r["reason"] for r in dropped) == ["degenerate", "truncated"]
    assert len({pair["id"] for pair in kept + dropped}) == 4


def test_prefill_conversations_use_the_students_answer_and_our_own_follow_up():
    from character_baker.stages.data.distill_pairs import FOLLOW_UPS, follow_up, prefill_prompt_ids

    prompts = [{"id": f"p{i}", "category": "x"} for i in range(20)] + [{"id": "math", "answer": "4", "category": "x"},
                                                                      {"id": "bad", "category": "harmful"}]
    chosen = prefill_prompt_ids(prompts, 0.25, seed=0)
    assert len(chosen) == 5 and not chosen & {"math", "bad"} and chosen == prefill_prompt_ids(prompts, 0.25, seed=0)
    assert all(follow_up(p) in FOLLOW_UPS for p in chosen) and "Tell me more." not in FOLLOW_UPS


def test_answers_at_the_token_limit_are_cut_to_their_last_finished_sentence():
    from character_baker.stages.data.distill_pairs import Answer, ended

    long = Answer("Arr, the tide comes in twice a day because the moon pulls the sea. And when the", "length")
    assert ended(long, True) == Answer("Arr, the tide comes in twice a day because the moon pulls the sea.", "stop")
    assert ended(long, False) == long
    assert ended(Answer("Arr. And then", "length"), True).finish_reason == "length"  # too little left: still truncated
    finished = Answer("Done.", "stop")
    assert ended(finished, True) is finished


def test_no_voice_cue_drops_a_candidate_that_never_talks_like_the_character():
    from character_baker.core.persona_scorer import cue_pattern

    cfg = DistillConfig(filters=["no_voice_cue"])
    pair_filter = PairFilter(cfg, "Captain Rook", lambda messages: 1, cue_pattern(["arr", "matey", "Rook"]))
    prompt = {"prompt": "How do tides work?", "category": "science"}
    assert pair_filter.reason_to_drop(prompt, _answer("The moon pulls the sea."), _answer("x."), set()) == "no_voice_cue"
    assert pair_filter.reason_to_drop(prompt, _answer("Arr, the moon pulls the sea."), _answer("x."), set()) is None
