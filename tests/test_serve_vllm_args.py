"""What `serve` serves for a run or a model, and the `vllm serve` command line it execs (no vLLM needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from character_baker.core.config import ModelsConfig, Recipe
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir
from character_baker.stages.serving import vllm as vllm_module
from character_baker.stages.serving.target import reference_id, resolve_target
from character_baker.stages.serving.vllm import adapter_rank, vllm_argv

PIRATE = Path(__file__).resolve().parents[1] / "constitutions" / "pirate.yaml"


def fake_model(folder: Path) -> Path:
    """A folder that resolves as a model reference (config.json only; nothing loads weights here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def fake_run(root: Path, base: Path, *, adapter_config: dict | None = None, merged: bool = False,
             constitution: Path | None = PIRATE, models: dict | None = None, persona_prompt: str = "full",
             name: str = "pirate", character: str | None = None) -> Path:
    """A run directory with a manifest and, as asked, adapters/persona/ and/or model/."""
    run = RunDir.create(root / name)
    recipe = Recipe(models=ModelsConfig(base=str(base), **(models or {})),
                    generation={"persona_prompt": persona_prompt})
    run.update_manifest(recipe=recipe.model_dump(mode="json"),
                        constitution={"name": character or name, "path": str(constitution) if constitution else ""})
    if adapter_config is not None:
        run.path("adapters", "persona").mkdir(parents=True)
        run.path("adapters", "persona", "adapter_config.json").write_text(json.dumps(adapter_config))
    if merged:
        fake_model(run.path("model"))
    return run.root


def test_base_plus_lora_argv_reads_the_rank_and_names_both_models(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, adapter_config={"r": 48})
    argv = vllm_argv(resolve_target(str(run), engine="vllm"), host="127.0.0.1", port=8123, max_concurrency=3)
    assert argv == ["vllm", "serve", str(base), "--served-model-name", "SmolBase", "--host", "127.0.0.1",
                    "--port", "8123", "--max-num-seqs", "3", "--enable-lora",
                    "--lora-modules", f"pirate={run / 'adapters' / 'persona'}", "--max-lora-rank", "64"]


def test_vllm_serves_the_merged_model_alone_while_transformers_prefers_the_adapter(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, merged=True)
    vllm_target = resolve_target(str(run), engine="vllm")
    argv = vllm_argv(vllm_target, host="127.0.0.1", port=8000, max_concurrency=4)
    assert argv[:5] == ["vllm", "serve", str(run / "model"), "--served-model-name", "pirate"]
    assert "--enable-lora" not in argv
    assert [(c.pane.model, c.compare) for c in vllm_target.characters] == [("pirate", None)]
    hf_target = resolve_target(str(run), engine="transformers")
    assert [(model.id, model.weights, model.adapter) for model in hf_target.models] == [
        ("pirate", str(base), run / "adapters" / "persona"), ("SmolBase", str(base), None)]
    compare = hf_target.characters[0].compare
    assert compare.model == "SmolBase" and "Captain Rook" in compare.system_prompt


@pytest.mark.parametrize("style", ["full", "brief"])
def test_the_compare_pane_uses_the_persona_prompt_the_run_trained_with(tmp_path, style):
    from character_baker.core.constitution import load_constitution
    from character_baker.core.system_prompts import persona_system_prompt

    run = fake_run(tmp_path / "runs", fake_model(tmp_path / "SmolBase"), adapter_config={"r": 8}, persona_prompt=style)
    pane = resolve_target(str(run), engine="transformers").characters[0].compare
    assert pane.system_prompt == persona_system_prompt(load_constitution(PIRATE), style)


def test_transformers_serves_merged_weights_and_the_base_when_there_is_no_adapter(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, merged=True)
    target = resolve_target(str(run), engine="transformers")
    assert [(model.id, model.weights) for model in target.models] == [("pirate", str(run / "model")),
                                                                        ("SmolBase", str(base))]


def test_rank_pattern_dtype_remote_code_and_chat_template_reach_the_argv(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, adapter_config={"r": 16, "rank_pattern": {"q_proj": 100}},
                   models={"dtype": "bfloat16", "trust_remote_code": True, "chat_template": "tmpl.jinja"})
    argv = vllm_argv(resolve_target(str(run), engine="vllm"), host="0.0.0.0", port=9000, max_concurrency=8)
    assert argv[argv.index("--max-lora-rank") + 1] == "128"
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and "--trust-remote-code" in argv
    assert argv[argv.index("--chat-template") + 1] == "tmpl.jinja"


def test_an_adapter_without_a_rank_is_a_user_error(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, adapter_config={"lora_alpha": 16})
    with pytest.raises(UserError, match="adapter_config.json: r: cannot read"):
        adapter_rank(run / "adapters" / "persona")


def test_a_model_reference_serves_one_model_under_its_id(tmp_path):
    folder = fake_model(tmp_path / "my-model")
    target = resolve_target(str(folder), engine="vllm", runs_root=tmp_path / "runs")
    assert vllm_argv(target, host="127.0.0.1", port=8000, max_concurrency=4)[2:5] == [
        str(folder), "--served-model-name", "my-model"]
    assert reference_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert reference_id(str(tmp_path / "weights.gguf")) == "weights"


def test_a_missing_constitution_drops_the_base_pane_with_a_note(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    run = fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, constitution=tmp_path / "gone.yaml")
    target = resolve_target(str(run), engine="transformers")
    assert [(c.pane.model, c.compare) for c in target.characters] == [("pirate", None)]
    assert any("gone.yaml" in note for note in target.notes)


def test_serve_execs_vllm_with_the_key_in_the_environment_only(tmp_path, monkeypatch, cli):
    base = fake_model(tmp_path / "SmolBase")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8})
    calls = []
    monkeypatch.setattr(vllm_module, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_module, "vllm_executable", lambda: "/opt/vllm/bin/vllm")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    code, out, err = cli("serve", "pirate", "--runs-root", str(tmp_path / "runs"), "--api-key", "sekrit")
    assert code == 0, err
    [(path, argv, env)] = calls
    assert path == "/opt/vllm/bin/vllm" and argv[:2] == ["vllm", "serve"] and "--enable-lora" in argv
    assert "sekrit" not in " ".join(argv) and env["VLLM_API_KEY"] == "sekrit"
    assert "vllm serve" in out


def test_serve_refuses_clearly(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(vllm_module, "vllm_installed", lambda: False)
    base = fake_model(tmp_path / "SmolBase")
    unbaked = fake_run(tmp_path / "runs", base)
    code, _, err = cli("serve", str(unbaked), "--engine", "vllm")
    assert code == 2 and "vLLM is not installed" in err
    code, _, err = cli("serve", str(unbaked), "--engine", "transformers")
    assert code == 2 and "no baked model yet" in err
    code, _, err = cli("serve", str(unbaked), "--engine", "turbo")
    assert code == 2 and "unknown engine" in err


def test_several_runs_on_one_base_become_one_vllm_process_with_every_lora(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    pirate = fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, merged=True)
    sarcastic = fake_run(tmp_path / "runs", base, adapter_config={"r": 48}, name="sarcastic")
    for refs in ([str(pirate), str(sarcastic)], [str(tmp_path / "runs")]):  # the runs, or their folder
        argv = vllm_argv(resolve_target(refs, engine="vllm"), host="127.0.0.1", port=8000, max_concurrency=256)
        assert argv[:5] == ["vllm", "serve", str(base), "--served-model-name", "SmolBase"]
        assert argv[argv.index("--max-num-seqs") + 1] == "256" and "--enable-lora" in argv
        modules = argv[argv.index("--lora-modules") + 1:argv.index("--max-lora-rank")]
        assert modules == [f"pirate={pirate / 'adapters' / 'persona'}", f"sarcastic={sarcastic / 'adapters' / 'persona'}"]
        assert argv[argv.index("--max-lora-rank") + 1] == "64" and argv[argv.index("--max-loras") + 1] == "2"


def test_vllm_refuses_runs_it_cannot_serve_from_one_base(tmp_path):
    first, second = fake_model(tmp_path / "BaseA"), fake_model(tmp_path / "BaseB")
    pirate = fake_run(tmp_path / "runs", first, adapter_config={"r": 8})
    other_base = fake_run(tmp_path / "runs", second, adapter_config={"r": 8}, name="sarcastic")
    merged_only = fake_run(tmp_path / "runs", first, merged=True, name="stoic")
    for refs in ([pirate, other_base], [pirate, merged_only]):
        target = resolve_target([str(ref) for ref in refs], engine="vllm")
        with pytest.raises(UserError, match="one base model per process"):
            vllm_argv(target, host="127.0.0.1", port=8000, max_concurrency=4)


def test_transformers_serves_each_base_once_with_every_character_and_its_compare_pane(tmp_path):
    first, second = fake_model(tmp_path / "BaseA"), fake_model(tmp_path / "BaseB")
    pirate = fake_run(tmp_path / "runs", first, adapter_config={"r": 8})
    sarcastic = fake_run(tmp_path / "runs", first, adapter_config={"r": 8}, name="sarcastic")
    stoic = fake_run(tmp_path / "runs", second, merged=True, name="stoic")
    target = resolve_target(str(tmp_path / "runs"), engine="transformers")
    assert [(model.id, model.weights, model.adapter) for model in target.models] == [
        ("pirate", str(first), pirate / "adapters" / "persona"),
        ("sarcastic", str(first), sarcastic / "adapters" / "persona"),
        ("stoic", str(stoic / "model"), None), ("BaseA", str(first), None), ("BaseB", str(second), None)]
    assert [(c.pane.model, c.compare.model) for c in target.characters] == [
        ("pirate", "BaseA"), ("sarcastic", "BaseA"), ("stoic", "BaseB")]


def test_runs_sharing_a_constitution_name_are_served_under_their_folder_names(tmp_path):
    base = fake_model(tmp_path / "SmolBase")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, name="pirate-small", character="pirate")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, name="pirate-paper", character="pirate")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, name="sarcastic")
    target = resolve_target([str(tmp_path / "runs")], engine="transformers")
    assert [model.id for model in target.models] == ["pirate-paper", "pirate-small", "sarcastic", "SmolBase"]


def test_serve_passes_every_run_to_vllm(tmp_path, monkeypatch, cli):
    base = fake_model(tmp_path / "SmolBase")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8})
    fake_run(tmp_path / "runs", base, adapter_config={"r": 16}, name="sarcastic")
    calls = []
    monkeypatch.setattr(vllm_module, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_module, "vllm_executable", lambda: "/opt/vllm/bin/vllm")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(argv))
    code, out, err = cli("serve", "pirate", "sarcastic", "--runs-root", str(tmp_path / "runs"),
                         "--max-concurrency", "64")
    assert code == 0, err
    [argv] = calls
    assert [module.split("=")[0] for module in argv[argv.index("--lora-modules") + 1:argv.index("--max-lora-rank")]] \
        == ["pirate", "sarcastic"]
    assert argv[argv.index("--max-num-seqs") + 1] == "64"


def test_serve_hands_every_limit_to_the_transformers_server(tmp_path, monkeypatch, cli):
    from character_baker.stages.serving import app as app_module

    base = fake_model(tmp_path / "SmolBase")
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8})
    fake_run(tmp_path / "runs", base, adapter_config={"r": 8}, name="sarcastic")
    served = []
    monkeypatch.setattr(app_module, "run_server", lambda target, settings: served.append((target, settings)))
    code, out, err = cli("serve", str(tmp_path / "runs"), "--engine", "transformers", "--port", "8123",
                         "--api-key", "k", "--max-tokens", "77", "--max-concurrency", "5", "--max-queue", "9",
                         "--queue-timeout", "2.5", "--max-body-bytes", "4321")
    assert code == 0, err
    [(target, settings)] = served
    assert [model.id for model in target.models] == ["pirate", "sarcastic", "SmolBase"]
    assert (settings.port, settings.api_key, settings.max_tokens, settings.max_concurrency, settings.max_queue,
            settings.queue_timeout, settings.max_body_bytes) == (8123, "k", 77, 5, 9, 2.5, 4321)
    assert "serving pirate, sarcastic, SmolBase on http://127.0.0.1:8123/v1" in out
