"""CLI basics: help, version, env, recipe and runs commands, exit codes."""

import json
import subprocess
import sys

from character_baker import __version__
from character_baker.core.runs import RunDir


def test_help_lists_the_commands(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("constitution", "recipe", "models", "runs", "env"):
        assert command in out


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from character_baker.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and __version__ in out


def test_env_json(cli):
    code, out, _ = cli("env", "--json")
    info = json.loads(out)
    assert code == 0 and info["character-baker"] == __version__
    assert {"torch", "transformers", "peft", "cuda available", "devices"} <= set(info)


def test_recipe_show_reports_sources(cli, tmp_path):
    code, out, _ = cli("recipe", "show", "--preset", "smoke", "--set", "distill.beta=0.25", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["recipe"]["distill"]["beta"] == 0.25
    assert data["sources"]["distill.beta"] == "--set"
    assert data["sources"]["distill.batch_size"] == "preset smoke"


def test_recipe_validate_ok_and_bad(cli, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("distill:\n  beta: 0.2\n")
    assert cli("recipe", "validate", str(good))[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  beta: high\n  lr: 3\n")
    code, out, err = cli("recipe", "validate", str(bad))
    assert code == 2
    assert f"{bad}:2: distill.beta" in err and f"{bad}:3: distill.lr" in err
    assert "Traceback" not in out + err


def test_recipe_file_that_is_not_yaml(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    code, _, err = cli("recipe", "validate", str(bad))
    assert code == 2 and "invalid YAML" in err and "Traceback" not in err


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("recipe", "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "file not found" in err


def test_runs_list_and_show(cli, tmp_path):
    run = RunDir.create(tmp_path / "runs" / "pirate-smoke")
    run.update_manifest(constitution={"name": "pirate", "path": "constitutions/pirate.yaml", "hash": "h"})
    run.set_stage("prompts", status="done", seconds=2.0, inputs_hash="ih", artifacts={"data/prompts.jsonl": "ah"})
    code, out, _ = cli("runs", "list", "--root", str(tmp_path / "runs"))
    assert code == 0 and "pirate-smoke" in out and "prompts:done" in out
    code, out, _ = cli("runs", "show", "pirate-smoke", "--root", str(tmp_path / "runs"))
    assert code == 0 and "data/prompts.jsonl" in out and "2.0" in out
    code, _, err = cli("runs", "show", "nope", "--root", str(tmp_path / "runs"))
    assert code == 2 and "no run directory" in err


def test_unknown_command_is_a_usage_error(cli):
    code, _, _ = cli("bake")
    assert code == 2
