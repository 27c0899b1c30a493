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


def _rows(flags: list[bool]) -> list[dict]:
    rows = []
    for index, flag in enumerate(flags):
        rows.append({"condition": "base", "answer_set": "plain", "prompt": f"p{index}", "answer": f"base {index}",
                     "in_character": False})
        rows.append({"condition": "trained", "answer_set": "plain", "prompt": f"p{index}", "answer": f"arr {index}",
                     "in_character": flag})
        rows.append({"condition": "trained", "answer_set": "break-0", "prompt": f"p{index}", "answer": "x",
                     "in_character": True})
    return rows


def test_side_by_side_shows_the_first_hits_and_the_first_miss_in_eval_order():
    from character_baker.stages.evaluation.stage import side_by_side

    chosen = side_by_side(_rows([False, True, False, True, True, True]), 3)
    assert [item["prompt"] for item in chosen["items"]] == ["p0", "p1", "p3", "p4"]  # eval order, not re-sorted
    assert chosen["in_character"] == 4 and chosen["n"] == 6
    assert [item["in_character"]["trained"] for item in chosen["items"]] == [False, True, True, True]
    assert chosen["items"][1]["answers"] == {"base": "base 1", "trained": "arr 1"}
    every_hit = side_by_side(_rows([True] * 5), 3)
    assert [item["prompt"] for item in every_hit["items"]] == ["p0", "p1", "p2"]  # no miss to show
    assert side_by_side([r for r in _rows([True]) if r["condition"] == "base"], 3) is None  # no trained condition


def test_end_of_train_lines_label_each_answer_and_state_the_rule():
    from character_baker.stages.evaluation.stage import side_by_side

    data = fixed_report()
    data["side_by_side"] = side_by_side(_rows([False, True, True]), 3)
    text = "\n".join(report.headline_lines(data))
    assert "2 of 3 trained answers are in character" in text and "eval/answers.jsonl" in text
    assert "trained (not in character): arr 0" in text and "trained (in character): arr 1" in text
    assert "base (not in character): base 2" in text
