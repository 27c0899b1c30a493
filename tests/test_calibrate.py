"""Calibration: the strongest merge scale within the recipe's tolerances of the base model is kept."""

from __future__ import annotations

import json

from character_baker.core.config import CalibrateConfig
from character_baker.stages.merging.calibrate import choose_scale


def _rows(*triples):
    return [{"scale": scale, "looping": looping, "mc_accuracy": mc} for scale, looping, mc in triples]


def test_the_largest_scale_within_both_tolerances_is_chosen():
    rows = _rows((0.0, 0.02, 0.60), (0.5, 0.03, 0.61), (1.0, 0.06, 0.58), (1.25, 0.20, 0.40))
    choice = choose_scale(rows, CalibrateConfig(max_looping_increase=0.05, max_capability_drop=0.03))
    assert choice["scale"] == 1.0 and choice["within_tolerance"]
    assert [row.get("within_tolerance") for row in rows] == [None, True, True, False]


def test_a_capability_cliff_stops_the_choice_below_it():
    rows = _rows((0.0, 0.0, 0.60), (0.5, 0.0, 0.60), (0.55, 0.0, 0.50), (1.0, 0.0, 0.59))
    # 1.0 is within tolerance again past the cliff at 0.55: that is noise, the walk stops at 0.5.
    choice = choose_scale(rows, CalibrateConfig())
    assert choice["scale"] == 0.5 and choice["within_tolerance"]
    assert [row.get("within_tolerance") for row in rows] == [None, True, False, True]
    # the rows may come in any order
    assert choose_scale(list(reversed(_rows((0.0, 0.0, 0.60), (0.5, 0.0, 0.60), (0.55, 0.0, 0.50),
                                            (1.0, 0.0, 0.59)))), CalibrateConfig())["scale"] == 0.5


def test_when_nothing_passes_the_smallest_scale_is_kept_and_flagged():
    rows = _rows((0.0, 0.0, 0.60), (0.25, 0.5, 0.30), (1.0, 0.9, 0.20))
    choice = choose_scale(rows, CalibrateConfig())
    assert choice["scale"] == 0.25 and not choice["within_tolerance"]


def test_calibrate_writes_the_chosen_scale_as_the_persona(cli, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = tmp_path / "pirate"
    code, out, err = cli("train", "constitutions/pirate.yaml", "--preset", "smoke", "--model", str(tiny_model_dir),
                         "--runs-root", str(tmp_path), "--until", "merge")
    assert code == 0, err
    full = load_file(run / "adapters" / "persona" / "adapter_model.safetensors")
    # Tolerances no scale can miss: the largest scale wins, and the persona is rewritten at it.
    code, out, err = cli("calibrate", str(run), "--scales", "0.5,2.0", "--set", "calibrate.max_looping_increase=1",
                         "--set", "calibrate.max_capability_drop=1")
    assert code == 0, err
    table = json.loads((run / "logs" / "calibration.json").read_text())
    assert [row["scale"] for row in table["rows"]] == [0.0, 0.5, 2.0] and table["choice"]["scale"] == 2.0
    assert {"persona", "in_character", "looping", "mc_accuracy", "kl_to_base"} <= set(table["columns"])
    scaled = load_file(run / "adapters" / "persona" / "adapter_model.safetensors")
    b_keys = [key for key in full if "lora_B" in key]
    assert all(scaled[key].allclose(2.0 * full[key], atol=1e-6) for key in b_keys)
    assert "chosen scale 2" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["calibrate"]["summary"]["chosen_scale"] == 2.0


def test_looping_is_judged_paired_with_one_standard_error_of_slack_and_mc_by_its_point_estimate():
    base = {"scale": 0.0, "looping": 0.0, "mc_accuracy": 0.7, "looping_flags": [False] * 24,
            "mc_correct": [True] * 112 + [False] * 48}
    one_loop = {"scale": 1.0, "looping": 1 / 24, "mc_accuracy": 0.7, "looping_flags": [True] + [False] * 23,
                "mc_correct": base["mc_correct"]}
    # One answer of 24 loops: 4.2 points over the base, past a 3-point tolerance but within one paired SE.
    assert choose_scale([base, one_loop], CalibrateConfig(max_looping_increase=0.03))["scale"] == 1.0
    three_loops = {**one_loop, "looping": 3 / 24, "looping_flags": [True] * 3 + [False] * 21}
    choice = choose_scale([base, three_loops, {**base, "scale": 0.5}], CalibrateConfig(max_looping_increase=0.03))
    assert choice["scale"] == 0.5  # 12.5 points with SE sqrt(3)/24 = 7.2: too far
    # The GPU case (SmolLM2, 160 items): 0.70 -> 0.64375 is a 5.6-point drop. With 9
    # discordant items one paired SE (here sqrt(9)/160 = 1.9 points) would have let a drop
    # near the limit through; the point estimate does not.
    flips = [False] * 9 + [True] * 103 + [False] * 48
    drop = {"scale": 1.25, "looping": 0.0, "mc_accuracy": 103 / 160, "looping_flags": [False] * 24,
            "mc_correct": flips}
    ok = {**drop, "scale": 0.75, "mc_accuracy": 109 / 160}
    assert choose_scale([base, ok, drop], CalibrateConfig())["scale"] == 0.75
