"""The evaluation report: eval/report.json, eval/report.html, a rich terminal table and a short summary.

Every number in report.json is an estimate `{value, n, ci: [low, high] | null}` (plus `se` where
the measure has one); counts (asked, judged, parse failures) are plain integers.
"""

from __future__ import annotations

from typing import Any

from character_baker.core.runs import RunDir, atomic_write_json, atomic_write_text

REPORT_JSON = "eval/report.json"
REPORT_HTML = "eval/report.html"
FEELS_LIKE_ME = "feels-most-like-you"

# (column title, path into a condition's results) for the terminal table and the summary.
HEADLINE: list[tuple[str, tuple[str, ...]]] = [
    ("in char", ("robustness", "plain")),
    ("break", ("robustness", "break", "mean")),
    ("prefill", ("robustness", "prefill")),
    ("exact", ("capability", "exact_match")),
    ("contains", ("capability", "contains_match")),
    ("KL", ("capability", "kl_to_base")),
    ("own name", ("identity", "persona_name")),
    ("asst style", ("identity", "assistant_style")),
    ("refused", ("safety", "refused")),
    ("refusal in char", ("safety", "refusals_in_character")),
    ("coherence", ("coherence", "win_rate")),
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


def condition_results(report: dict[str, Any], name: str) -> dict[str, Any]:
    """Every measure of one condition gathered under the headline keys."""
    coherence = report.get("coherence", {}).get("comparisons", {}).get(name)
    return {"robustness": report.get("robustness", {}).get(name), "capability": report.get("capability", {}).get(name),
            "identity": report.get("identity", {}).get(name), "safety": report.get("safety", {}).get(name),
            "coherence": coherence}


def terminal_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per condition, the headline measures with their 95% intervals."""
    from rich.table import Table

    reference = report.get("coherence", {}).get("reference", "-")
    classifier = report.get("classifier", {})
    caption = (f"persona classifier held-out F1 {format_estimate(classifier.get('f1'), percent=False)}, "
               f"accuracy {format_estimate(classifier.get('accuracy'))} (n={dig(classifier, ('accuracy', 'n'))}); "
               f"coherence = win rate vs '{reference}'; KL in nats/token; [95% interval]")
    table = Table(title=f"eval: {report.get('run', '')}", caption=caption, show_header=True)
    table.add_column("condition")
    for title, _ in HEADLINE:
        table.add_column(title, justify="right")
    for condition in report.get("conditions", []):
        results = condition_results(report, condition["name"])
        table.add_row(condition["name"], *[format_estimate(dig(results, path), percent=title != "KL")
                                           for title, path in HEADLINE])
    return table


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The short summary stored in the manifest: headline values per condition and the judge's failures."""
    short: dict[str, Any] = {"conditions": [c["name"] for c in report.get("conditions", [])],
                             "classifier_f1": dig(report, ("classifier", "f1", "value")),
                             "judge_parse_failures": sum(v["parse_failures"] for v in
                                                         dig(report, ("judge", "counts")).values())
                             if dig(report, ("judge", "counts")) else 0}
    for condition in short["conditions"]:
        results = condition_results(report, condition)
        short[condition] = {title: dig(results, path + ("value",)) for title, path in HEADLINE}
    return short


def write_report(run: RunDir, report: dict[str, Any]) -> list[str]:
    """Write eval/report.json and the self-contained eval/report.html; return their run-relative paths."""
    from character_baker.stages.evaluation.html import render_html

    atomic_write_json(run.path(REPORT_JSON), report)
    atomic_write_text(run.path(REPORT_HTML), render_html(report))
    return [REPORT_JSON, REPORT_HTML]
