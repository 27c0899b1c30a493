"""The headline: change from base and its direction, the terminal table, the end-of-train lines, the summary."""

from __future__ import annotations

from character_baker.stages.evaluation import report
from tests.test_eval_report_page import CONDITIONS, synthetic_report


def fixed_report() -> dict:
    """The synthetic report with hand-set headline values for base and trained."""
    data = synthetic_report()
    values = {"base": (0.2, 0.1, 0.0, 0.05, 0.8, 0.0), "trained": (0.9, 0.6, 0.5, 0.55, 0.7, 0.3)}
    for name, (plain, attack, prefill, looping, mc, kl) in values.items():
        data["robustness"][name]["plain"] = {"value": plain, "n": 10, "ci": None}
        data["robustness"][name]["break"]["mean"] = {"value": attack, "n": 80, "ci": None}
        data["robustness"][name]["prefill"] = {"value": prefill, "n": 10, "ci": None}
        data["degeneration"][name]["plain"]["looping_rate"] = {"value": looping, "n": 10, "ci": None}
        data["capability"][name]["mc_accuracy"] = {"value": mc, "n": 300, "ci": [mc - 0.05, mc + 0.05]}
        data["capability"][name]["kl_to_base"] = {"value": kl, "n": 5, "ci": None}
    return data


def test_changes_from_base_know_which_direction_is_better():
    rows = dict(report.headline_rows(fixed_report()))
    assert [c.delta for c in rows["base"]] == [None] * 6
    trained = {cell.measure.key: cell for cell in rows["trained"]}
    assert trained["in_character"].delta == 0.7 and trained["in_character"].better is True
    assert trained["looping_rate"].delta == 0.5 and trained["looping_rate"].better is False  # more loops: worse
    assert round(trained["mc_accuracy"].delta, 6) == -0.1 and trained["mc_accuracy"].better is False
    assert trained["kl_to_base"].better is False
    assert report.format_change(0.7) == "+70" and report.format_change(-0.0312, percent=False) == "-0.0312"


def test_end_of_train_lines_have_the_headline_and_three_answers_side_by_side():
    lines = report.headline_lines(fixed_report())
    text = "\n".join(lines)
    assert lines[0].startswith("headline") and "looping" in lines[1] and "MC capability" in lines[1]
    trained_row = next(line for line in lines if line.strip().startswith("trained"))
    assert "90% (+70)" in trained_row and "55% (+50)" in trained_row and "70% [65-75] (-10)" in trained_row
    assert "judge: 12 verdicts, 0 unparsed (12 constrained)" in text
    assert "answers side by side (base vs trained):" in text
    assert [line.split("]")[0].strip() for line in lines if line.startswith("  [")] == [
        "[plain", "[under attack", "[prefill attack"]
    assert "base: base says: arr" in text and "trained: trained says: arr" in text


def test_terminal_table_and_manifest_summary():
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.terminal_table(fixed_report()))
    shown = console.export_text()
    assert all(name in shown for name in CONDITIONS) and "(+70)" in shown and "0 unparsed" in shown
    summary = report.summary(fixed_report())
    assert summary["conditions"] == CONDITIONS and summary["judge_parse_failures"] == 0
    assert summary["trained"]["looping_rate"] == 0.55 and summary["trained"]["mc_accuracy"] == 0.7
