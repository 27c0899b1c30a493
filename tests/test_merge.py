"""Exact merges: folded logits equal base + weighted adapters, weight 0 is the base, SVD, PEFT linear, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from character_baker.core.config import LoraConfig
from character_baker.core.runs import RunDir
from character_baker.stages.merging.delta import (adapter_factors, combine_exact, fold_into, load_adapters,
                                                  peft_linear, truncate)

PIRATE = Path("constitutions/pirate.yaml")
WEIGHTS = {"distill": 1.0, "introspect": 0.25}



def save_random_adapter(model, folder: Path, *, seed: int, r: int = 8, alpha: int = 16) -> Path:
    """A LoRA on a copy of `model` with random A and B (B starts at zero), saved as a PEFT folder."""
    from character_baker.backends.models import attach_lora

    peft_model = attach_lora(copy.deepcopy(model), LoraConfig(r=r, alpha=alpha), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(folder))
    return folder


def make_run(tmp_path: Path, model_dir: Path, adapters: dict[str, int] | None = None) -> RunDir:
    """A run directory with a recorded smoke recipe on `model_dir` and random adapters (name -> seed)."""
    from transformers import AutoModelForCausalLM

    from character_baker.cli.common import resolve_settings
    from character_baker.core.stage import StageContext
    from character_baker.pipeline.runner import record_run_metadata

    constitution, resolved = resolve_settings(PIRATE, "smoke", None, [], str(model_dir))
    run = RunDir.create(tmp_path / "run")
    record_run_metadata(StageContext(run, constitution, resolved.recipe, constitution_path=PIRATE))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, seed in (adapters or {}).items():
        save_random_adapter(model, run.path("adapters", name), seed=seed)
    return run


def _adapters(tmp_path, model):
    return {"distill": save_random_adapter(model, tmp_path / "distill", seed=1),
            "introspect": save_random_adapter(model, tmp_path / "introspect", seed=2)}


def _factors(model, folders):
    peft_model = load_adapters(copy.deepcopy(model), folders)
    return peft_model, {name: adapter_factors(peft_model, name) for name in folders}


def _ids(tokenizer):
    return tokenizer("Ahoy there, who are you? Tell me about the sea.", return_tensors="pt")["input_ids"]


@torch.no_grad()
def test_folded_model_logits_equal_base_plus_weighted_adapters(tmp_path, tiny_lm):
    from peft.tuners.lora import LoraLayer

    model, tokenizer = tiny_lm
    folders = _adapters(tmp_path, model)
    reference = load_adapters(copy.deepcopy(model), folders)
    reference.base_model.set_adapter(["distill", "introspect"])  # PEFT adds both deltas in forward
    for module in reference.modules():
        if isinstance(module, LoraLayer):
            module.scaling["introspect"] *= WEIGHTS["introspect"]
    peft_model, factors = _factors(model, folders)
    folded = peft_model.unload()
    fold_into(folded, combine_exact(factors, WEIGHTS))

    ids = _ids(tokenizer)
    expected, got, base = reference(ids).logits, folded(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapters really changed the model


@torch.no_grad()
def test_weight_zero_gives_the_base_exactly(tmp_path, tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    peft_model, factors = _factors(model, _adapters(tmp_path, model))
    folded = peft_model.unload()
    fold_into(folded, combine_exact(factors, {"distill": 0.0, "introspect": 0.0}))
    before, after = model.state_dict(), folded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_svd_at_full_rank_is_exact_and_truncation_reports_its_residual(tmp_path, tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("llama", tiny_tok)
    _, factors = _factors(model, _adapters(tmp_path, model))
    exact = combine_exact(factors, WEIGHTS)
    assert {low_rank.rank for low_rank in exact.values()} == {16}  # 8 + 8, stacked

    full, residual = truncate(exact, 16)
    for path, low_rank in exact.items():
        torch.testing.assert_close(full[path].delta(), low_rank.delta(), rtol=1e-4, atol=1e-6)
    assert residual.overall < 1e-6 and residual.worst < 1e-6

    low, residual = truncate(exact, 4)
    assert {low_rank.rank for low_rank in low.values()} == {4}
    for path, low_rank in exact.items():
        measured = (low_rank.delta() - low[path].delta()).norm() / low_rank.delta().norm()
        assert residual.per_module[path] == pytest.approx(float(measured), rel=1e-3)
    assert 0 < residual.overall <= residual.worst < 1


def test_peft_linear_includes_cross_terms(tmp_path, tiny_tok):
    from character_baker.testing import tiny_model

    model = tiny_model("qwen2", tiny_tok)
    peft_model, factors = _factors(model, _adapters(tmp_path, model))
    linear = peft_linear(peft_model, WEIGHTS)
    exact = combine_exact(factors, WEIGHTS)
    path = next(iter(exact))
    scaling = {n: peft_model.peft_config[n].lora_alpha / peft_model.peft_config[n].r for n in WEIGHTS}
    raw_b = {n: factors[n][path].B / scaling[n] for n in WEIGHTS}  # our B carries the scaling; PEFT's does not
    root = {n: (WEIGHTS[n] * scaling[n]) ** 0.5 for n in WEIGHTS}
    cross = sum(root[i] * root[j] * raw_b[i] @ factors[j][path].A for i in WEIGHTS for j in WEIGHTS if i != j)
    # PEFT linear = (sum_i root_i B_i)(sum_j root_j A_j) = the exact weighted sum + the cross terms.
    torch.testing.assert_close(linear[path].delta(), exact[path].delta() + cross, rtol=1e-4, atol=1e-6)
    assert cross.abs().max() > 1e-3


def test_merge_command_folds_writes_the_persona_and_sweeps(tmp_path, cli, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = make_run(tmp_path, tiny_model_dir, {"distill": 1, "introspect": 2})
    code, out, err = cli("merge", str(run.root), "--scales", "0,0.5,1", "--sweep-prompts", "3", "--sweep-tokens", "12")
    assert code == 0, err
    persona = json.loads(run.path("adapters", "persona", "adapter_config.json").read_text())
    assert persona["r"] == persona["lora_alpha"] == 16 and persona["base_model_name_or_path"] == str(tiny_model_dir)

    ids = torch.tensor([[5, 17, 42, 7, 99]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(run.path("model"))(ids).logits
        lora = PeftModel.from_pretrained(base, str(run.path("adapters", "persona")))(ids).logits
    torch.testing.assert_close(full, lora, rtol=1e-4, atol=1e-5)

    table = json.loads(run.path("logs", "merge_sweep.json").read_text())
    assert table["columns"] == ["scale", "kl_to_base", "top1_agreement"]
    kl = [row["kl_to_base"] for row in table["rows"]]
    assert [row["scale"] for row in table["rows"]] == [0.0, 0.5, 1.0]
    assert abs(kl[0]) < 1e-6 and table["rows"][0]["top1_agreement"] == 1.0 and kl[0] < kl[1] < kl[2]
    assert "merge scale sweep" in out and "kl_to_base" in out

    code, out, err = cli("merge", str(run.root), "--mode", "svd", "--rank", "4")
    assert code == 0, err
    assert json.loads(run.path("adapters", "persona", "adapter_config.json").read_text())["r"] == 4
    summary = run.stage("merge")["summary"]
    assert summary["mode"] == "svd" and 0 < summary["residual_overall"] < 1
    assert not any(run.path("model").iterdir())  # the fold's full weights no longer match the persona


def test_merge_command_names_missing_adapters_and_bad_weights(tmp_path, cli, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, {"distill": 1})
    code, _, err = cli("merge", str(run.root))
    assert code == 2 and "adapters/introspect" in err and "character-baker introspect" in err
    code, _, err = cli("merge", str(run.root), "--weights", "distill=heavy")
    assert code == 2 and "NAME=WEIGHT" in err
    code, _, err = cli("merge", str(run.root), "--weights", "distill=0")
    assert code == 2 and "non-zero weight" in err
