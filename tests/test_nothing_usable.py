"""A data stage whose filters leave nothing says so: exit 2, counts per filter, the fix, no promised file."""

from __future__ import annotations

from pathlib import Path

PIRATE = Path(__file__).resolve().parent.parent / "constitutions" / "pirate.yaml"


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_distill_data_with_every_pair_filtered_exits_2_with_the_counts_and_the_fix(cli, tmp_path, tiny_model_dir):
    # The random tiny model never ends an answer within two tokens: every chosen answer is truncated.
    code, out, err = cli("distill", str(PIRATE), "--data-only", "--preset", "smoke", "--model", str(tiny_model_dir),
                         "--run", str(tmp_path / "run"), "--set", "generation.teacher.sampling.max_new_tokens=2")
    assert code == 2, (out, err)
    message = _flat(err)
    # 80 prompts (the smoke sizes) x best_of 2 candidates, every one cut off at 2 tokens.
    assert "distill_data: no usable pairs: every one was filtered (truncated 160)" in message
    assert "raise generation.teacher.sampling.max_new_tokens (now 2)" in message
    assert "pairs:" not in out and "Traceback" not in err
    assert (tmp_path / "run" / "data" / "distill.filtered.jsonl").is_file()  # the drops are kept, with reasons


def test_introspect_data_with_every_example_filtered_exits_2(cli, tmp_path, tiny_model_dir):
    base = ["--preset", "smoke", "--model", str(tiny_model_dir), "--run", str(tmp_path / "run")]
    code, out, err = cli("distill", str(PIRATE), *base)
    assert code == 0, err
    code, out, err = cli("introspect", str(PIRATE), *base, "--set", "introspect.max_length=16")
    assert code == 2, (out, err)
    message = _flat(err)
    assert "introspect_data: no usable introspection examples: every one was filtered (over_length 12)" in message
    assert "raise introspect.max_length (now 16)" in message
    assert "adapter:" not in out and not (tmp_path / "run" / "adapters" / "introspect").exists()
