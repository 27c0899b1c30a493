"""Offloading optimizer state, activations and the input embedding to the CPU keeps the training math."""

from __future__ import annotations

import pytest
import torch

from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir, read_jsonl
from character_baker.stages.training.dpo import train_dpo
from character_baker.stages.training.offload import ActivationOffload, CpuEmbedding, offload_input_embeddings
from character_baker.testing import tiny_model
from tests.test_training_dpo import toy_config, toy_records


def _train(tmp_path, tiny_tok, name, **overrides):
    run = RunDir.create(tmp_path / name)
    model = tiny_model("llama", tiny_tok)
    summary = train_dpo(run, toy_records(8), model, tiny_tok, toy_config(**overrides))
    lora = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    return summary, lora, read_jsonl(run.path("logs", "distill.jsonl")), model


@pytest.mark.parametrize("flags", [dict(offload_optimizer=True),
                                   dict(offload_activations=True, gradient_checkpointing=True),
                                   dict(offload_optimizer=True, offload_activations=True, offload_embeddings=True,
                                        gradient_checkpointing=True)],
                         ids=["optimizer", "activations", "all"])
def test_offloaded_training_matches_plain_training(tmp_path, tiny_tok, flags, monkeypatch):
    # micro-batches of 2 in batches of 4: gradients accumulate over two backward passes
    from character_baker.stages.training import offload

    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)  # tiny tensors: offload them all
    packed = []
    original_pack = ActivationOffload._pack
    monkeypatch.setattr(ActivationOffload, "_pack", lambda self, t: packed.append(t.shape) or original_pack(self, t))
    _, plain, plain_log, _ = _train(tmp_path, tiny_tok, "plain", gradient_checkpointing=flags.get("gradient_checkpointing", False))
    summary, offloaded, log, model = _train(tmp_path, tiny_tok, "offloaded", **flags)
    assert summary["steps"] == 2 and plain.keys() == offloaded.keys()
    for name, value in plain.items():
        torch.testing.assert_close(offloaded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(v.abs().sum() > 0 for n, v in offloaded.items() if "lora_B" in n)  # training moved the adapter
    for a, b in zip(plain_log, log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert bool(packed) == bool(flags.get("offload_activations"))
    if flags.get("offload_embeddings"):
        assert isinstance(model.get_input_embeddings(), CpuEmbedding)
    # The published adapter holds the float32 master weights, not the compute copies.
    from safetensors.torch import load_file
    saved = load_file(summary["adapter_path"] + "/adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_activation_offload_copies_each_saved_tensor_once_and_restores_it():
    offload = ActivationOffload(min_bytes=64)
    weight = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(8, 32, requires_grad=True)
    with offload:
        hidden = x @ weight           # saves x and weight (a leaf that is no Parameter: offloaded too)
        out = (hidden * hidden).sum()  # saves `hidden` twice: stored once
        stored = dict(offload._stored)
    assert len(stored) == 3 and sorted(entry["uses"] for entry in stored.values()) == [1, 1, 2]
    out.backward()
    assert not offload._stored  # every stored tensor was handed back and released
    expected_x = (2 * (x @ weight)) @ weight.t()
    torch.testing.assert_close(x.grad, expected_x.detach())


def test_cpu_embedding_looks_up_the_same_rows(tiny_tok):
    model = tiny_model("llama", tiny_tok).requires_grad_(False)  # frozen, as under LoRA
    ids = torch.tensor([[1, 5, 7, 2]])
    before = model(input_ids=ids).logits
    offload_input_embeddings(model)
    assert isinstance(model.get_input_embeddings(), CpuEmbedding)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_cpu_embedding_staging_buffer_from_inference_mode_takes_training_writes():
    # The reference pass (inference mode) allocates the staging buffer first; training reuses it.
    embedding = CpuEmbedding(torch.nn.Embedding(10, 4).requires_grad_(False), torch.device("cpu"))
    ids = torch.tensor([3, 1, 4, 1, 5, 9])
    with torch.inference_mode():
        torch.index_select(embedding.weight, 0, ids, out=embedding.staging_rows(len(ids)))
    rows = embedding.staging_rows(len(ids) - 2)  # reused, not grown
    torch.index_select(embedding.weight, 0, ids[:4], out=rows)  # raised on an inference tensor
    assert not rows.is_inference()
    torch.testing.assert_close(rows, embedding.weight[ids[:4]])
    assert embedding.staging_rows(2 * len(ids)).shape == (12, 4)  # grown


def test_tied_embeddings_stay_with_the_output_head(tiny_tok):
    model = tiny_model("llama", tiny_tok).requires_grad_(False)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    assert offload_input_embeddings(model) is None
    assert not isinstance(model.get_input_embeddings(), CpuEmbedding)


def test_offload_settings_that_cannot_work_are_reported(tmp_path, tiny_tok, monkeypatch):
    with pytest.raises(UserError) as error:
        train_dpo(RunDir.create(tmp_path / "a"), toy_records(8), tiny_model("llama", tiny_tok), tiny_tok,
                  toy_config(offload_activations=True))
    assert "distill.offload_activations" in str(error.value) and "gradient_checkpointing: true" in str(error.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as error:
        train_dpo(RunDir.create(tmp_path / "b"), toy_records(8), tiny_model("llama", tiny_tok), tiny_tok,
                  toy_config(offload_optimizer=True, micro_batch_size=1))
    assert "distill.offload_optimizer" in str(error.value) and "one process" in str(error.value)
