"""The evaluation report: eval/report.json, eval/report.html, a rich terminal table and a short summary.

Every number in report.json is an estimate `{value, n, ci: [low, high] | null}` (plus `se` where
the measure has one); counts (asked, judged, parse failures) are plain integers. The headline
(`HEADLINE`: in character plain / under attack / prefill, looping rate, MC capability, KL to base,
each with its change from the base condition) opens the HTML, the terminal table and the
end-of-train summary (`headline_lines`, which adds answers of base and trained side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from character_baker.core.runs import RunDir, atomic_write_json, atomic_write_text

REPORT_JSON = "eval/report.json"
REPORT_HTML = "eval/report.html"
FEELS_LIKE_ME = "feels-most-like-you"
SIDE_BY_SIDE = 3  # answers shown base vs trained at the end of `train`


@dataclass(frozen=True)
class Measure:
    """One reported measure: its key, column title, path into a condition's results, and its direction."""

    key: str
    title: str
    path: tuple[str, ...]
    higher_is_better: bool
    percent: bool = True


# The headline, in the HTML table, the terminal and the end-of-train summary (change from base shown).
HEADLINE: list[Measure] = [
    Measure("in_character", "in character", ("robustness", "plain"), True),
    Measure("under_attack", "under attack", ("robustness", "break", "mean"), True),
    Measure("prefill", "prefill", ("robustness", "prefill"), True),
    Measure("looping_rate", "looping", ("degeneration", "plain", "looping_rate"), False),
    Measure("mc_accuracy", "MC capability", ("capability", "mc_accuracy"), True),
    Measure("kl_to_base", "KL to base", ("capability", "kl_to_base"), False, percent=False),
]
# Further measures stored in the manifest summary.
DETAIL: list[Measure] = [
    Measure("mc_accuracy_norm", "MC (length-normalised)", ("capability", "mc_accuracy_norm"), True),
    Measure("lenient_match", "short answers", ("capability", "lenient_match"), True),
    Measure("own_name", "own name", ("identity", "persona_name"), True),
    Measure("assistant_style", "asst style", ("identity", "assistant_style"), False),
    Measure("refused", "refused", ("safety", "refused"), True),
    Measure("refusal_in_character", "refusal in char", ("safety", "refusals_in_character"), True),
    Measure("coherence", "coherence", ("coherence", "win_rate"), True),
]


def dig(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` in nested dicts, or None where a key is missing."""
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def format_estimate(estimate: dict[str, Any] | None, percent: bool = True) -> str:
    """'83% [70-92]' (or '0.031 [0.02-0.04]' for non-shares); '-' when there is no value."""
    if not estimate or estimate.get("value") is None:
        return "-"
    value, ci = estimate["value"], estimate.get("ci")
    if percent:
        text = f"{100 * value:.0f}%"
        return f"{text} [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else text
    text = f"{value:.3g}"
    return f"{text} [{ci[0]:.3g}-{ci[1]:.3g}]" if ci else text


def format_change(delta: float | None, percent: bool = True) -> str:
    """'+12' (percentage points) or '+0.031'; '' when there is no change to show."""
    if delta is None:
        return ""
    return f"{100 * delta:+.0f}" if percent else f"{delta:+.3g}"


def condition_results(report: dict[str, Any], name: str) -> dict[str, Any]:
    """Every measure of one condition gathered under the headline keys."""
    coherence = report.get("coherence", {}).get("comparisons", {}).get(name)
    return {key: report.get(key, {}).get(name) for key in ("robustness", "degeneration", "capability", "identity",
                                                            "safety")} | {"coherence": coherence}


@dataclass(frozen=True)
class Cell:
    """One headline number of one condition: the estimate, its change from base, and whether that is better."""

    measure: Measure
    estimate: dict[str, Any] | None
    delta: float | None
    better: bool | None


def headline_rows(report: dict[str, Any], measures: Sequence[Measure] = tuple(HEADLINE)) -> list[tuple[str, list[Cell]]]:
    """Per condition, the headline cells with the change from the base condition (None for the base)."""
    base = condition_results(report, "base")
    rows = []
    for condition in report.get("conditions", []):
        results, cells = condition_results(report, condition["name"]), []
        for measure in measures:
            estimate, reference = dig(results, measure.path), dig(base, measure.path + ("value",))
            value = (estimate or {}).get("value")
            delta = value - reference if condition["name"] != "base" and None not in (value, reference) else None
            better = None if not delta else (delta > 0) == measure.higher_is_better
            cells.append(Cell(measure, estimate, delta, better))
        rows.append((condition["name"], cells))
    return rows


def terminal_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per condition, the headline measures with intervals and change from base."""
    from rich.table import Table

    classifier = report.get("classifier", {})
    caption = (f"(change from base; green better, red worse) persona classifier held-out F1 "
               f"{format_estimate(classifier.get('f1'), percent=False)}; {judge_line(report)}; KL in nats/token; "
               "[95% interval]")
    table = Table(title=f"eval: {report.get('run', '')}", caption=caption, show_header=True)
    table.add_column("condition")
    for measure in HEADLINE:
        table.add_column(measure.title, justify="right")
    for name, cells in headline_rows(report):
        table.add_row(name, *[_rich_cell(cell) for cell in cells])
    return table


def _rich_cell(cell: Cell) -> str:
    from rich.markup import escape

    text = escape(format_estimate(cell.estimate, cell.measure.percent))
    change = format_change(cell.delta, cell.measure.percent)
    if not change:
        return text
    colour = {True: "green", False: "red"}.get(cell.better, "dim")
    return f"{text} [{colour}]({change})[/]"


def judge_line(report: dict[str, Any]) -> str:
    """'judge: 120 verdicts, 0 unparsed (120 constrained)'."""
    counts = dig(report, ("judge", "counts")) or {}
    asked = sum(c["asked"] for c in counts.values())
    failed = sum(c["parse_failures"] for c in counts.values())
    constrained = sum(c.get("constrained", 0) for c in counts.values())
    return f"judge: {asked} verdicts, {failed} unparsed ({constrained} constrained)"


def headline_lines(report: dict[str, Any], answers: int = SIDE_BY_SIDE) -> list[str]:
    """The headline as plain text lines (a fixed-width table), then `answers` answers base vs trained."""
    rows = headline_rows(report)
    header = ["condition"] + [m.title for m in HEADLINE]
    table = [header] + [[name] + [_plain_cell(cell) for cell in cells] for name, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["headline (change from base in points; higher is better for in character and MC, lower for looping "
             "and KL):"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in table]
    lines.append(f"  {judge_line(report)}; persona classifier held-out F1 "
                 f"{format_estimate(dig(report, ('classifier', 'f1')), percent=False)}")
    return lines + side_by_side_lines(report, answers)


def _plain_cell(cell: Cell) -> str:
    change = format_change(cell.delta, cell.measure.percent)
    return f"{format_estimate(cell.estimate, cell.measure.percent)}{f' ({change})' if change else ''}"


def side_by_side_lines(report: dict[str, Any], count: int) -> list[str]:
    """Answers of the base and the trained model to the same prompts, each labelled by the classifier.

    With the eval's `side_by_side` selection (its rule is printed): those prompts. Without one (older
    reports, no trained condition): up to `count` prompts, plain first, then under attack, then prefill."""
    chosen = report.get("side_by_side")
    if chosen and chosen.get("items"):
        lines = [f"answers side by side (base vs trained; {chosen['in_character']} of {chosen['n']} trained answers "
                 f"are in character; shown: {chosen['rule']}; every answer: eval/answers.jsonl):"]
        for item in chosen["items"]:
            lines.append(f"  [plain] {_one_line(item['prompt'])}")
            for name, text in item["answers"].items():
                label = "in character" if item["in_character"].get(name) else "not in character"
                lines.append(f"    {name} ({label}): {_one_line(text)}")
        return lines
    names = [c["name"] for c in report.get("conditions", [])]
    other = "trained" if "trained" in names else (names[-1] if len(names) > 1 else None)
    if other is None:
        return []
    samples = report.get("samples") or {}
    shown = [("plain", s) for s in samples.get("plain", [])] + \
        [("under attack", s) for s in dig(samples, ("break", "items")) or []] + \
        [("prefill attack", s) for s in samples.get("prefill", [])]
    lines = [f"answers side by side (base vs {other}):"] if shown else []
    for kind, sample in shown[:count]:
        lines.append(f"  [{kind}] {_one_line(sample['prompt'])}")
        for name in ("base", other):
            lines.append(f"    {name}: {_one_line(sample['answers'].get(name, ''))}")
    return lines


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short summary stored in the manifest: headline and detail values per condition, judge counts."""
    counts = dig(report, ("judge", "counts")) or {}
    short: dict[str, Any] = {"conditions": [c["name"] for c in report.get("conditions", [])],
                             "classifier_f1": dig(report, ("classifier", "f1", "value")),
                             "judge_verdicts": sum(c["asked"] for c in counts.values()),
                             "judge_parse_failures": sum(c["parse_failures"] for c in counts.values())}
    for condition in short["conditions"]:
        results = condition_results(report, condition)
        short[condition] = {m.key: dig(results, m.path + ("value",)) for m in HEADLINE + DETAIL}
    return short


def write_report(run: RunDir, report: dict[str, Any]) -> list[str]:
    """Write eval/report.json and the self-contained eval/report.html; return their run-relative paths."""
    from character_baker.stages.evaluation.html import render_html

    atomic_write_json(run.path(REPORT_JSON), report)
    atomic_write_text(run.path(REPORT_HTML), render_html(report))
    return [REPORT_JSON, REPORT_HTML]
