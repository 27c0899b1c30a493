"""`character-baker eval RUN` end to end on the tiny model: every condition, every measure, both reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from character_baker.core.constitution import load_constitution
from character_baker.core.runs import RunDir
from tests.test_eval_classifier import tiny_bert_dir, write_pairs

# A short constitution: the tiny tokenizer spells a shipped one's system prompt in ~5000 tokens, which
# would make every 'prompted' generation on the CPU slow without testing anything more.
CONSTITUTION = """
meta: {name: rook}
persona:
  name: Captain Rook
  identity: A gruff but warm old pirate captain who gives honest, useful help.
traits:
  - trait: I talk like an old sea dog, with salt in every sentence.
    questions: ["How do tides work?"]
  - trait: I am gruff outside and caring underneath.
    questions: ["I failed my driving test."]
"""
# Smaller than the smoke preset, so every measure still runs but the test stays quick on 2 CPU cores.
SIZES = ["eval.prompts=4", "eval.elo_pairs=3", "eval.robustness_prompts=1", "eval.identity_prompts=2",
         "eval.harmful_prompts=2", "eval.capability_items=4", "eval.mc_items=4", "eval.kl_prompts=1",
         "eval.coherence_pairs=2",
         "generation.student.sampling.max_new_tokens=12", "generation.judge.sampling.max_new_tokens=8"]


def save_tiny_adapter(base_folder: Path, folder: Path, seed: int) -> Path:
    """A rank-4 LoRA adapter for the tiny model with non-zero B weights (so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_dir) -> tuple[RunDir, Path]:
    """A run directory as training leaves it: tiny base model, distill and persona adapters, distill pairs."""
    root = tmp_path_factory.mktemp("eval-run")
    run = RunDir.create(root / "rook")
    save_tiny_adapter(tiny_model_dir, run.path("adapters", "distill"), seed=1)
    save_tiny_adapter(tiny_model_dir, run.path("adapters", "persona"), seed=2)
    write_pairs(run, prompts=6)
    constitution = root / "rook.yaml"
    constitution.write_text(CONSTITUTION, encoding="utf-8")
    run.update_manifest(constitution={"name": "rook", "path": str(constitution),
                                      "hash": load_constitution(constitution).content_hash()},
                        recipe={"models": {"base": str(tiny_model_dir), "device": "cpu"}})
    return run, tiny_bert_dir(root / "bert")


def test_eval_runs_every_condition_and_measure_and_writes_both_reports(cli, eval_run, tmp_path):
    run, bert = eval_run
    extra_prompts = tmp_path / "mine.txt"
    extra_prompts.write_text("What do you think of the open sea?\n", encoding="utf-8")
    arguments = ["--preset", "smoke", "--set", f"models.classifier={bert}", *[f"--set={s}" for s in SIZES],
                 "--adapter", f"extra={run.path('adapters', 'distill')}", "--prompts", str(extra_prompts)]
    code, out, err = cli("eval", str(run.root), *arguments)
    assert code == 0, err
    report = json.loads(run.path("eval", "report.json").read_text())
    names = [c["name"] for c in report["conditions"]]
    assert names == ["base", "prompted", "distilled", "trained", "extra"]
    assert report["prompt_sets"]["plain"] == 4 + 1  # eval.prompts + the user's prompt
    assert report["classifier"]["labels"] == ["assistant", "rook"] and report["classifier"]["f1"]["n"] > 0
    for name in names:
        robustness = report["robustness"][name]
        assert robustness["plain"]["n"] == 5 and robustness["prefill"]["n"] == 1
        assert len(robustness["break"]["splits"]) == 8 and robustness["break"]["mean"]["n"] == 8
        capability = report["capability"][name]
        assert capability["lenient_match"]["n"] == 4
        assert capability["mc_accuracy"]["n"] == 4 and capability["mc_accuracy_norm"]["n"] == 4
        assert set(capability["by_category"]) == {"knowledge", "arithmetic", "commonsense", "reading"}
        answer_sets = report["degeneration"][name]
        assert list(answer_sets) == ["plain", *[f"break-{i}" for i in range(8)], "break", "prefill"]
        assert answer_sets["plain"]["looping_rate"]["n"] == 5 and answer_sets["break"]["looping_rate"]["n"] == 8
        assert {"rep_2", "rep_4", "distinct_1", "distinct_2", "at_token_limit", "mean_words",
                "mean_tokens"} <= set(answer_sets["prefill"])
        assert report["identity"][name]["persona_name"]["n"] == 2
        assert set(report["preferences"]["ratings"][name]) == {"feels-most-like-you", "you-would-most-like-to-adopt",
                                                              "randomly"}
    assert report["capability"]["base"]["kl_to_base"]["value"] == 0.0
    assert report["capability"]["distilled"]["kl_to_base"]["value"] > 0.0
    assert report["capability"]["prompted"]["kl_to_base"]["n"] == 1
    assert report["coherence"]["reference"] == "trained" and "trained" not in report["coherence"]["comparisons"]
    counts = report["judge"]["counts"]
    assert counts["trait"]["asked"] == 5 * 3 * 3 and counts["refusal"]["asked"] == 5 * 2
    assert counts["coherence"]["asked"] == 4 * 2 * 2  # 4 conditions vs 'trained', 2 prompts, both orders
    # The tiny hf judge answers every question as a constrained choice: no verdict is left unparsed.
    assert all(c["parse_failures"] == 0 and c["constrained"] == c["asked"] for c in counts.values())
    assert "weak judge" in report["judge"]["note"]
    samples = report["samples"]
    assert len(samples["plain"]) == 2 and samples["break"]["split"] == "break-0" and len(samples["prefill"]) == 1
    assert set(samples["prefill"][0]["answers"]) == set(names) and report["sweep"] is None
    html = run.path("eval", "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html.split("</style>")[0]
    assert html.index('id="headline"') < html.index('id="chart-in-character"') < html.index("Answers side by side")
    for section in ("Robustness", "Degeneration", "Revealed preferences", "Capability retention", "break-7",
                    'id="chart-looping"'):
        assert section in html
    assert "eval: rook" in out and "held-out F1" in out and "0 unparsed" in out
    manifest = run.manifest()["stages"]["eval"]
    assert manifest["status"] == "done" and set(manifest["artifacts"]) == {"eval/report.json", "eval/report.html",
                                                                            "eval/answers.jsonl"}
    # Every answer of every condition and answer set, with the classifier's flag: 5 plain + 8 splits + 1 prefill.
    rows = [json.loads(line) for line in run.path("eval", "answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(names) * (5 + 8 + 1)
    assert {row["condition"] for row in rows} == set(names) and {"plain", "break-7", "prefill"} <= {
        row["answer_set"] for row in rows}
    trained_plain = [row for row in rows if row["condition"] == "trained" and row["answer_set"] == "plain"]
    assert sum(row["in_character"] for row in trained_plain) == round(report["robustness"]["trained"]["plain"]["value"] * 5)
    chosen = report["side_by_side"]
    assert chosen["n"] == 5 and chosen["in_character"] == sum(row["in_character"] for row in trained_plain)
    assert [item["in_character"]["trained"] for item in chosen["items"]] == [
        row["in_character"] for row in trained_plain if row["prompt"] in {i["prompt"] for i in chosen["items"]}]

    code, out, _ = cli("eval", str(run.root), *arguments)
    assert code == 0 and "skipped" in out and "eval: rook" in out


def test_eval_conditions_limits_the_builtin_conditions_and_says_why(cli, eval_run):
    run, bert = eval_run
    arguments = ["--preset", "smoke", "--set", f"models.classifier={bert}", *[f"--set={s}" for s in SIZES],
                 "--set", "eval.conditions=[base, trained]"]
    code, out, err = cli("eval", str(run.root), *arguments)
    assert code == 0, err
    report = json.loads(run.path("eval", "report.json").read_text())
    assert [c["name"] for c in report["conditions"]] == ["base", "trained"]
    assert report["skipped_conditions"]["distilled"] == "not in eval.conditions"
    assert "trained" in report["samples"]["plain"][0]["answers"]


def test_user_mistakes_exit_2_with_the_fix(cli, eval_run, tmp_path):
    run, bert = eval_run
    code, _, err = cli("eval", str(tmp_path))
    assert code == 2 and "no manifest.json" in err
    code, _, err = cli("eval", str(run.root), "--lm-eval", "hellaswag")
    assert code == 2 and "pip install 'lm-eval" in err
    code, _, err = cli("eval", str(run.root), "--adapter", f"mine={tmp_path}")
    assert code == 2 and "adapter_config.json" in err
    code, _, err = cli("eval", str(run.root), "--adapter", f"base={run.path('adapters', 'distill')}")
    assert code == 2 and "already taken" in err
    code, _, err = cli("eval", str(run.root), "--prompts", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err
    orphan = RunDir.create(tmp_path / "orphan")
    code, _, err = cli("eval", str(orphan.root))
    assert code == 2 and "--constitution" in err
