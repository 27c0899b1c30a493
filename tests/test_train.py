"""`train`: the chain, partial runs, the dry-run plan, the summary, and batch runs."""

import json

import pytest

from character_baker.core.config import Recipe
from character_baker.core.errors import UserError
from character_baker.pipeline.chain import plan_stages, select_stages, with_push_pull

# Random tiny models never finish a sentence: keep only the filters they can pass, and shrink
# the sizes further than the smoke preset so a three-character batch stays quick on 2 cores.
TINY = ["distill.filters=[empty, duplicate]", "introspect.filters=[empty]", "prompts.general_prompts=3",
        "prompts.synthesized_prompts=1", "prompts.questions_per_trait=1", "eval.prompts=2",
        "eval.robustness_prompts=1", "eval.identity_prompts=1", "eval.harmful_prompts=1", "eval.elo_pairs=2",
        "eval.coherence_pairs=1", "eval.capability_items=2", "eval.kl_prompts=1", "eval.bootstrap=10",
        "eval.sample_answers=1"]


def tiny_args(model_dir, runs_root):
    args = ["--preset", "smoke", "--model", str(model_dir), "--runs-root", str(runs_root)]
    for item in TINY:
        args += ["--set", item]
    return args


def test_method_decides_the_chain():
    assert plan_stages(Recipe()) == ["prompts", "distill_data", "distill", "introspect_data", "introspect", "merge",
                                     "calibrate", "eval"]
    with_sdft = Recipe(method=["distill", "sdft", "push_pull"])
    assert plan_stages(with_sdft) == ["prompts", "distill_data", "distill", "profile", "sdft", "merge", "calibrate",
                                      "eval"]
    assert "calibrate" not in plan_stages(Recipe(calibrate={"enabled": False}))
    assert with_push_pull(with_sdft).push_pull.enabled
    with pytest.raises(UserError):
        plan_stages(Recipe(method=["introspect"]))


def test_partial_runs_select_stages():
    planned = plan_stages(Recipe())
    assert select_stages(planned, start="distill", until="introspect") == ["distill", "introspect_data", "introspect"]
    assert select_stages(planned, only=["merge", "eval"]) == ["merge", "eval"]
    with pytest.raises(UserError) as info:
        select_stages(planned, start="sdft")
    assert "not a stage of this recipe's chain" in str(info.value)
    with pytest.raises(UserError):
        select_stages(planned, start="merge", until="distill")


def test_dry_run_prints_the_plan_and_runs_nothing(cli, tmp_path, tiny_model_dir):
    code, out, err = cli("train", "constitutions/pirate.yaml", "--dry-run", *tiny_args(tiny_model_dir, tmp_path))
    assert code == 0, err
    for word in ("prompts", "distill_data", "introspect", "merge", "eval", "estimated tokens", "estimated time",
                 "counts: prompts"):
        assert word in out
    assert not (tmp_path / "pirate" / "data" / "prompts.jsonl").exists()


def test_dry_run_warns_when_the_planned_data_cannot_fill_a_batch(cli, tmp_path, tiny_model_dir):
    args = tiny_args(tiny_model_dir, tmp_path)
    code, out, err = cli("train", "constitutions/pirate.yaml", "--dry-run", *args)
    assert code == 0, err
    flat = " ".join(out.split())
    # Smoke sizes: 10 reflections + 2 interactions for a batch of 4 fill it; no warning for introspect.
    assert "warning: introspect" not in flat
    code, out, err = cli("train", "constitutions/pirate.yaml", "--dry-run", *args, "--set", "introspect.batch_size=16",
                         "--set", "sdft.batch_size=16", "--set", "method=[distill, introspect, sdft]",
                         "--set", "sdft.shrink_batch_to_data=false")
    assert code == 0, err
    flat = " ".join(out.split())
    assert ("warning: introspect: at most 12 introspection examples planned (before filters) for "
            "introspect.batch_size 16: the batch will shrink to fit") in flat
    assert "warning: sdft: at most 8 prompts planned (before filters) for sdft.batch_size 16: the stage will stop" in flat


def test_train_runs_the_chain_then_skips_and_resumes(cli, tmp_path, tiny_model_dir):
    code, out, err = cli("train", "constitutions/pirate.yaml", *tiny_args(tiny_model_dir, tmp_path))
    assert code == 0, err
    run = tmp_path / "pirate"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [n for n, e in manifest["stages"].items() if e["status"] == "done"] == [
        "prompts", "distill_data", "distill", "introspect_data", "introspect", "merge", "calibrate", "eval"]
    assert (run / "model" / "config.json").is_file() and (run / "eval" / "report.html").is_file()
    assert "train summary" in out and "tokens generated" in out and "persona classifier" in out
    # Unchanged inputs: every stage is skipped.
    code, out, _ = cli("train", "constitutions/pirate.yaml", *tiny_args(tiny_model_dir, tmp_path))
    stages = ["prompts", "distill_data", "distill", "introspect_data", "introspect", "merge", "calibrate", "eval"]
    assert code == 0 and all(f"[{stage}] inputs unchanged" in out for stage in stages)
    assert out.count("skip (inputs unchanged)") == 8  # the plan knew it too
    # A changed merge weight reruns merge and what follows it, nothing before it.
    code, out, _ = cli("train", "constitutions/pirate.yaml", *tiny_args(tiny_model_dir, tmp_path),
                       "--set", "merge.weights.introspect=0.5", "--from", "merge")
    assert code == 0 and "[merge] inputs unchanged" not in out
    # An output deleted by hand: its stage runs again (the plan says so too) instead of being skipped.
    import shutil

    shutil.rmtree(run / "adapters" / "distill")
    code, out, err = cli("train", "constitutions/pirate.yaml", *tiny_args(tiny_model_dir, tmp_path),
                         "--set", "merge.weights.introspect=0.5", "--until", "distill")
    flat = " ".join(out.split())
    assert code == 0, err
    assert "[distill] inputs unchanged, but adapters/distill" in flat and "gone: running it again" in flat
    assert "[prompts] inputs unchanged since the last run: skipped" in out
    assert (run / "adapters" / "distill" / "adapter_model.safetensors").is_file()


def test_dry_run_counts_only_the_planned_stages(cli, tmp_path, tiny_model_dir):
    args = tiny_args(tiny_model_dir, tmp_path)
    code, out, err = cli("train", "constitutions/pirate.yaml", "--dry-run", *args, "--set", "method=[distill]")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "counts: prompts" in flat and "distill_pairs" in flat
    assert "reflections" not in flat and "interactions" not in flat  # no introspection in this method
    code, out, _ = cli("train", "constitutions/pirate.yaml", "--dry-run", *args)
    assert "reflections" in " ".join(out.split())


def test_batch_continues_past_a_failure_and_reports_json(cli, tmp_path, tiny_model_dir):
    broken = tmp_path / "broken.yaml"
    broken.write_text("meta: {name: broken}\npersona: {name: X, identity: Y}\ntraits: []\n")
    code, out, err = cli("train", "constitutions/sarcastic.yaml", str(broken), "constitutions/poetic.yaml",
                         "constitutions/loving.yaml", *tiny_args(tiny_model_dir, tmp_path / "runs"), "--json")
    assert code == 1  # one character failed
    rows = json.loads(out[out.index("[\n"):])
    assert [row["ok"] for row in rows] == [True, False, True, True]
    assert "traits" in rows[1]["error"]
    for name in ("sarcastic", "poetic", "loving"):
        assert (tmp_path / "runs" / name / "eval" / "report.json").is_file()


def test_a_folder_of_constitutions_is_a_batch(tmp_path):
    from character_baker.pipeline.train import expand_constitution_paths

    (tmp_path / "a.yaml").write_text("x")
    (tmp_path / "b.yml").write_text("x")
    assert [p.name for p in expand_constitution_paths([tmp_path])] == ["a.yaml", "b.yml"]
    with pytest.raises(UserError):
        expand_constitution_paths([tmp_path / "empty"]) if (tmp_path / "empty").mkdir() is None else None
