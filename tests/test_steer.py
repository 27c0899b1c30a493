"""Steering: the layer range, exactly strength x vector added where it should be, hooks gone afterwards."""

from __future__ import annotations

import pytest
import torch

from character_baker.backends.steering import (SteeringVectors, decoder_layers, load_steering, steering,
                                               steering_layers, strength_sweep)
from character_baker.core.config import SamplingConfig
from character_baker.core.errors import UserError
from character_baker.core.runs import RunDir



def _layer_outputs(model, ids):
    outputs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


def test_default_range_is_an_eighth_to_seven_eighths_of_depth():
    assert steering_layers(32) == range(4, 28)
    assert steering_layers(8) == range(1, 7)
    assert steering_layers(30) == range(3, 27)
    assert steering_layers(4) == range(0, 4)
    assert steering_layers(1) == range(0, 1)
    assert steering_layers(32, 0.5, 0.5) == range(16, 17)  # never empty


def test_steering_adds_strength_times_vector_in_range_only_and_cleans_up(tiny_lm):
    model, _ = tiny_lm
    layers = len(decoder_layers(model))
    torch.manual_seed(0)
    vectors = SteeringVectors(torch.randn(layers, model.config.hidden_size), "mean_diff", "test")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    plain, plain_logits = _layer_outputs(model, ids)
    with steering(model, vectors, 3.0, layer_start=0.25, layer_end=0.75) as chosen:
        steered, steered_logits = _layer_outputs(model, ids)
    assert chosen == range(1, 3)
    torch.testing.assert_close(steered[0], plain[0])  # before the range: untouched
    # The first steered layer sees unchanged inputs, so its output moves by exactly 3 x its vector, everywhere.
    torch.testing.assert_close(steered[1] - plain[1], (3.0 * vectors.vectors[1]).expand_as(plain[1]), atol=1e-5, rtol=0)
    assert not torch.allclose(steered_logits, plain_logits)
    _, after_logits = _layer_outputs(model, ids)
    torch.testing.assert_close(after_logits, plain_logits)  # hooks removed
    with steering(model, vectors, 0.0):
        _, zero_logits = _layer_outputs(model, ids)
    torch.testing.assert_close(zero_logits, plain_logits)


def _write_profile(folder, layers: int, hidden: int):
    from character_baker.stages.profiling import report

    torch.manual_seed(1)
    z = torch.randn(layers, hidden) * 3
    tensors = {"mean_on": torch.randn(layers, hidden), "mean_off": torch.randn(layers, hidden),
               "var_on": torch.rand(layers, hidden), "var_off": torch.rand(layers, hidden), "z": z,
               "push": (z > 2).to(torch.uint8), "pull": (z < -2).to(torch.uint8), "importance": z.pow(2).mean(-1).sqrt(),
               "layer_scale": torch.ones(layers), "steer_mean_diff": torch.randn(layers, hidden),
               "steer_pca": torch.randn(layers, hidden), "pca_explained": torch.rand(layers)}
    run = RunDir.create(folder)
    report.write_profile(run, tensors, {"model": "tiny", "z_threshold": 2.0, "prompts": 4,
                                        "push_fallback_layers": [], "pull_fallback_layers": []}, heatmap_dims=8)
    return run.path("profile", "profile.safetensors"), tensors


def test_load_steering_reads_either_vector_and_rejects_bad_input(tmp_path, tiny_lm):
    model, _ = tiny_lm
    path, tensors = _write_profile(tmp_path / "run", 4, model.config.hidden_size)
    assert torch.equal(load_steering(path, "mean_diff").vectors, tensors["steer_mean_diff"])
    assert torch.equal(load_steering(path, "pca").vectors, tensors["steer_pca"])
    with pytest.raises(UserError, match="no activation profile"):
        load_steering(tmp_path / "missing.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_steering(tmp_path / "damaged.safetensors")
    with pytest.raises(UserError, match="unknown steering vector"):
        load_steering(path, "median")  # type: ignore[arg-type]
    wrong = SteeringVectors(torch.zeros(3, model.config.hidden_size), "pca", "x")
    with pytest.raises(UserError, match="does not fit this model"):
        with steering(model, wrong, 1.0):
            pass


def test_strength_sweep_zero_strength_is_the_plain_model_and_the_eval_hook_steers(tmp_path, tiny_lm):
    from character_baker.backends.generation.hf import HFBackend
    from character_baker.backends.steering import steered_backend
    from character_baker.core.config import SteerConfig

    model, tokenizer = tiny_lm
    backend = HFBackend(model, tokenizer, batch_size=4)
    torch.manual_seed(2)
    vectors = SteeringVectors(torch.randn(4, model.config.hidden_size) * 20, "mean_diff", "test")
    conversations = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Tell me a story."}]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    plain = [row[0].text for row in backend.generate(conversations, greedy)]
    results = strength_sweep(backend, vectors, [0.0, 8.0], conversations, greedy)
    assert [r["strength"] for r in results] == [0.0, 8.0] and results[0]["layers"] == [0, 3]
    assert results[0]["answers"] == plain
    assert results[1]["answers"] != plain

    path, tensors = _write_profile(tmp_path / "run", 4, model.config.hidden_size)
    steered = steered_backend(backend, path.parent, SteerConfig(strength=8.0, layer_start=0.0, layer_end=1.0))
    assert steered.adapter_fingerprint(None) != backend.adapter_fingerprint(None)  # cached answers never mix
    swept = strength_sweep(backend, load_steering(path), [8.0], conversations, greedy, layer_start=0.0, layer_end=1.0)
    assert [row[0].text for row in steered.generate(conversations, greedy)] == swept[0]["answers"]
