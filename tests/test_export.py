"""export: a standard Hugging Face folder that a fresh process loads and generates with; fresh shards, card, adapters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from character_baker.core.runs import write_jsonl_atomic
from tests.test_merge import make_run

FRESH_PROCESS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0, -1]
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
print(json.dumps({"ids": ids[0].tolist(), "logits": logits.tolist(), "generated": generated.tolist()}))
"""


def stale_index_base(tmp_path: Path, model_dir: Path) -> Path:
    """A copy of the tiny model with a shard index that names a shard which does not exist."""
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00009.safetensors"}}))
    return base


def test_export_writes_a_loadable_folder_with_fresh_shards_card_and_adapters(tmp_path, cli, tiny_model_dir):
    base = stale_index_base(tmp_path, tiny_model_dir)
    run = make_run(tmp_path, base, {"distill": 1, "introspect": 2})
    code, _, err = cli("export", str(run.root), "--out", str(tmp_path / "too-early"))
    assert code == 2 and "character-baker merge" in err
    write_jsonl_atomic(run.path("data", "introspection.jsonl"), [{"id": str(i), "messages": []} for i in range(3)])
    run.path("eval").mkdir(exist_ok=True)
    run.path("eval", "report.json").write_text(json.dumps({"summary": {"persona_score": 0.81}}))
    assert cli("merge", str(run.root))[0] == 0

    single = tmp_path / "single"
    code, out, err = cli("export", str(run.root), "--out", str(single))
    assert code == 0, err
    assert not list(single.glob("*.index.json"))  # one shard, and the source's stale index never copied
    card = (single / "README.md").read_text()
    for expected in ("Captain Rook", f"base_model: {base}", "| introspection examples | 3 |", "| persona_score | 0.81 |",
                     "distill: 1.0", "introspect: 0.25"):
        assert expected in card, expected
    for name in ("distill", "introspect", "persona"):
        config = json.loads((single / "adapters" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
    assert (single / "chat_template.jinja").is_file() and (single / "generation_config.json").is_file()

    sharded = tmp_path / "sharded"
    code, _, err = cli("export", str(run.root), "--out", str(sharded), "--max-shard-size", "300KB")
    assert code == 0, err
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(sharded)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(fresh["generated"]) > 0
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(run.path("model"))(torch.tensor([fresh["ids"]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(fresh["logits"]), expected, rtol=1e-4, atol=1e-5)

    code, _, err = cli("export", str(run.root), "--out", str(sharded))
    assert code == 2 and "--force" in err
