"""Profile: streaming statistics equal the batch ones, hooks read answer tokens only, sets, files, PNG."""

from __future__ import annotations

import json
import struct
import zlib

import torch

from character_baker.backends.steering import read_profile
from character_baker.core.config import ProfileConfig
from character_baker.core.runs import RunDir
from character_baker.stages.profiling import report
from character_baker.stages.profiling.profile import (ProfiledPair, analyse, build_pairs, draw_prompts,
                                                      profile_activations, select_dimensions, z_scores)
from character_baker.stages.profiling.stats import RunningMoments, TopComponentSketch



def test_running_moments_equal_the_whole_batch_statistics():
    torch.manual_seed(0)
    data = torch.randn(23, 3, 5) * 4 + 7
    moments = RunningMoments()
    for chunk in data.split([1, 7, 5, 10]):
        moments.update(chunk)
    assert moments.count == 23
    torch.testing.assert_close(moments.mean, data.double().mean(0))
    torch.testing.assert_close(moments.variance, data.double().var(0))


def test_sketch_finds_the_first_component_without_keeping_the_rows():
    torch.manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(2, 12), dim=-1)  # one per layer
    rows = torch.randn(60, 2, 1) * 5 * direction + 0.3 * torch.randn(60, 2, 12)
    sketch = TopComponentSketch(rank=4)
    for chunk in rows.split(7):
        sketch.update(chunk)
    assert sketch.sketch.shape == (2, 4, 12)  # never more than `rank` rows per layer
    component = sketch.first_component()
    exact = torch.stack([torch.linalg.svd(rows[:, layer].double(), full_matrices=False)[2][0] for layer in range(2)])
    assert torch.all((component * exact).sum(-1).abs() > 0.999)
    assert torch.all((component.float() * direction).sum(-1).abs() > 0.99)
    assert torch.all(sketch.explained() > 0.8)


def test_z_scores_and_sets_with_fallback():
    z = z_scores(torch.tensor([[3.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.0, 1.0]]),
                 torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(z, torch.tensor([[2.0, 0.0, -2.0]]))  # (3-1)/1, zero variance -> 0, (-1-1)/1
    z = torch.tensor([[3.0, 0.5, -2.5, 0.1], [0.4, 0.9, -0.2, 1.5]])
    push, fallback = select_dimensions(z, 2.0, top_n=2, sign=+1)
    assert push.tolist() == [[True, False, False, False], [False, True, False, True]] and fallback == [1]
    pull, fallback = select_dimensions(z, 2.0, top_n=2, sign=-1)
    assert pull.tolist() == [[False, False, True, False], [False, False, True, False]] and fallback == [1]


def test_draw_prompts_goes_round_robin_across_categories_and_prefers_unhinted():
    records = [{"id": f"{c}{i}", "prompt": f"{c} {i}", "category": c, **({"hint": "h"} if i == 0 else {})}
               for c in "abc" for i in range(3)]
    drawn = draw_prompts(records, 5, seed=0)
    assert [r["category"] for r in drawn] == ["a", "b", "c", "a", "b"]
    assert not any(r.get("hint") for r in drawn)


def _answer_means_by_hand(model, pair: ProfiledPair) -> torch.Tensor:
    """[layers, hidden] means over the answer tokens of the persona-on sequence, run alone (no padding)."""
    with torch.no_grad():
        out = model(torch.tensor([pair.on_ids]), output_hidden_states=True)
    return torch.stack([h[0, pair.on_start:].mean(0) for h in out.hidden_states[1:]])


def test_hooks_average_answer_tokens_only_and_padding_never_counts(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [{"id": f"p{i}", "prompt": text} for i, text in enumerate(["Who are you?", "Write a poem about the ocean.",
                                                                          "What is 2 + 2?"])]
    on = ["Arr!", "Ahoy matey, the sea is wide and the wind is fair.", "It is 4, arr."]
    off = ["I am a helpful assistant.", "Let me explain step by step.", ""]
    pairs, dropped = build_pairs(tokenizer, "You are a pirate.", prompts, on, off)
    assert dropped == 1 and len(pairs) == 2  # an empty answer has no tokens to average
    one_by_one = profile_activations(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=1)
    padded = profile_activations(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=2)
    expected = torch.stack([_answer_means_by_hand(model, pair) for pair in pairs]).double()
    # Final layer outputs: transformers' last hidden state is after the final norm, so compare layers 0..L-2.
    torch.testing.assert_close(one_by_one.on.mean[:-1], expected.mean(0)[:-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.on.mean, one_by_one.on.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.off.variance, one_by_one.off.variance, atol=1e-5, rtol=1e-4)


def test_profile_files_summary_and_heatmap(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [{"id": f"p{i}", "prompt": f"Question number {i}?"} for i in range(6)]
    pairs, _ = build_pairs(tokenizer, "You are a pirate.", prompts, [f"Arr, matey {i}!" for i in range(6)],
                           [f"I am a helpful assistant {i}." for i in range(6)])
    accumulator = profile_activations(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=4, include_mlp=True)
    tensors, facts = analyse(accumulator, ProfileConfig(prompts=6, top_n_fallback=3))
    summary = report.write_profile(RunDir.create(tmp_path / "run"), tensors, {"model": "tiny", "z_threshold": 2.0, **facts},
                                   heatmap_dims=10)
    loaded, metadata = read_profile(tmp_path / "run" / "profile" / "profile.safetensors")
    layers, hidden = 4, model.config.hidden_size
    assert loaded["z"].shape == (layers, hidden) and loaded["mlp_z"].shape == (layers, model.config.intermediate_size)
    assert json.loads(metadata["prompts"]) == 6
    # Every layer has push and pull dimensions (threshold or fallback), and the PCA vector lies along the mean shift.
    assert all(loaded["push"][i].any() and loaded["pull"][i].any() for i in range(layers))
    cosine = torch.nn.functional.cosine_similarity(loaded["steer_pca"], loaded["steer_mean_diff"], dim=-1)
    assert torch.all(cosine > 0)
    on_disk = json.loads((tmp_path / "run" / "profile" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["push_dims"] == int(loaded["push"].sum()) and len(on_disk["top_layers"]) == layers
    assert len(on_disk["heatmap"]["dims"]) == 10
    png = (tmp_path / "run" / "profile" / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (10 * report.CELL_PX, layers * report.CELL_PX)


def test_png_encoder_round_trips_pixels():
    z = torch.tensor([[-4.0, 0.0, 4.0]])
    png = report.heatmap_png(z, clip=4.0, cell=1)
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    raw = zlib.decompress(png[41:41 + length])
    assert raw == b"\x00" + bytes([0, 0, 255, 255, 255, 255, 255, 0, 0])  # blue, white, red
    assert png.endswith(b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))
