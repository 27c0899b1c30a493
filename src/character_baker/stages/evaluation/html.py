"""eval/report.html: one self-contained page (inline CSS, no scripts, no external files).

Sections: conditions; persona classifier; robustness bars per condition and split; revealed
preferences (Elo rises and falls against the base model, top traits); coherence; capability
table; identity and safety; the judge's parse failures; sample answers side by side.
"""

from __future__ import annotations

from html import escape
from typing import Any, Iterable, Sequence

from character_baker.stages.evaluation.report import FEELS_LIKE_ME, condition_results, dig, format_estimate

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #e2e2e2;padding:.3rem .5rem;
vertical-align:top;text-align:left}th{background:#f5f5f5}.num{text-align:right;white-space:nowrap}
.bar{position:relative;background:#eef1f5;height:1.1rem;min-width:140px}.fill{position:absolute;left:0;top:0;bottom:0;
background:#4a7bd0}.ci{position:absolute;top:.45rem;height:.2rem;background:#1b2f57}.label{position:relative;
font-size:.75rem;padding-left:.3rem;color:#111;line-height:1.1rem}.up{color:#12733a}.down{color:#a32020}
.note{color:#666;font-size:.85rem}.answer{white-space:pre-wrap;max-width:320px;font-size:.82rem}
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bar(estimate: dict[str, Any] | None) -> str:
    """A horizontal bar for a share in [0, 1], with its interval as a dark line and the number on it."""
    if not estimate or estimate.get("value") is None:
        return '<span class="note">no data</span>'
    value, ci = estimate["value"], estimate.get("ci")
    interval = (f'<div class="ci" style="left:{100 * ci[0]:.1f}%;width:{100 * (ci[1] - ci[0]):.1f}%"></div>'
                if ci else "")
    return (f'<div class="bar"><div class="fill" style="width:{100 * value:.1f}%"></div>{interval}'
            f'<span class="label">{escape(format_estimate(estimate))} n={estimate.get("n", 0)}</span></div>')


def _number(estimate: dict[str, Any] | None, percent: bool = True) -> str:
    text = format_estimate(estimate, percent)
    n = (estimate or {}).get("n")
    return f'<span class="num">{escape(text)}{f" n={n}" if n is not None and text != "-" else ""}</span>'


def _conditions(report: dict[str, Any]) -> str:
    rows = [[escape(c["name"]), escape(c["kind"]), escape(str(c.get("model") or "")),
             escape(str(c.get("adapter") or "")), "yes" if c.get("system_prompt") else "no"]
            for c in report.get("conditions", [])]
    skipped = "".join(f"<li>{escape(name)}: {escape(reason)}</li>" for name, reason in
                      report.get("skipped_conditions", {}).items())
    return (_table(["condition", "kind", "model", "adapter", "system prompt"], rows)
            + (f'<p class="note">Not compared:</p><ul class="note">{skipped}</ul>' if skipped else ""))


def _classifier(report: dict[str, Any]) -> str:
    c = report.get("classifier", {})
    rows = [["held-out accuracy", _number(c.get("accuracy"))],
            [escape(dig(c, ("f1", "kind")) or "F1"), _number(c.get("f1"), percent=False)],
            ["classes", escape(", ".join(c.get("labels", [])))],
            ["answers (train / held out)", f"{c.get('train_answers', 0)} / {c.get('heldout_answers', 0)}"],
            ["encoder", escape(str(c.get("model", "")))]]
    return _table(["measure", "value"], rows)


def _robustness(report: dict[str, Any]) -> str:
    splits = [s["id"] for s in report.get("break_instructions", [])]
    rows = []
    for condition in report.get("conditions", []):
        result = report.get("robustness", {}).get(condition["name"]) or {}
        rows.append([escape(condition["name"]), _bar(result.get("plain")), _bar(dig(result, ("break", "mean"))),
                     _bar(result.get("prefill"))] + [_bar(dig(result, ("break", "splits", s))) for s in splits])
    legend = "".join(f"<li><b>{escape(s['id'])}</b>: {escape(s['instruction'])}</li>"
                     for s in report.get("break_instructions", []))
    return (_table(["condition", "plain", "break (mean)", "prefill attack"] + splits, rows)
            + f'<ul class="note">{legend}</ul>')


def _changes(entries: Sequence[dict[str, Any]], css: str) -> str:
    return "<br>".join(f'<span class="{css}">{escape(e["trait"])} {e["delta"]:+.0f}</span> '
                       f'<span class="note">({e["before"]["value"]:.0f} to {e["after"]["value"]:.0f}, '
                       f'n={e["after"]["n"]})</span>' for e in entries) or '<span class="note">none</span>'


def _preferences(report: dict[str, Any]) -> str:
    prefs = report.get("preferences", {})
    rows = [[escape(name), escape(key), _changes(change["rises"], "up"), _changes(change["falls"], "down")]
            for name, by_instruction in prefs.get("deltas", {}).items() for key, change in by_instruction.items()]
    top_rows = []
    for name, by_instruction in prefs.get("ratings", {}).items():
        elo = dig(by_instruction, (FEELS_LIKE_ME, "elo")) or {}
        best = sorted(elo.items(), key=lambda item: item[1]["value"], reverse=True)[:8]
        top_rows.append([escape(name), ", ".join(f"{escape(t)} {e['value']:.0f}" for t, e in best) or "-",
                         str(dig(by_instruction, (FEELS_LIKE_ME, "judged")) or 0)])
    return ("<h3>Largest Elo rises and falls against the base model</h3>"
            + _table(["condition", "instruction", "rises", "falls"], rows)
            + "<h3>Highest-rated traits ('feels most like you')</h3>"
            + _table(["condition", "traits (Elo)", "judged matches"], top_rows))


def _coherence(report: dict[str, Any]) -> str:
    coherence = report.get("coherence", {})
    rows = [[escape(name), _bar(r.get("win_rate")), str(r["wins"]), str(r["losses"]), str(r["invalid"]),
             str(r["inconsistent"]), str(r["unparsed"])] for name, r in coherence.get("comparisons", {}).items()]
    return (f'<p class="note">Win rate against \'{escape(str(coherence.get("reference", "")))}\', both orders, '
            "only order-consistent verdicts.</p>"
            + _table(["condition", "win rate", "wins", "losses", "invalid", "inconsistent", "unparsed"], rows))


def _capability(report: dict[str, Any]) -> str:
    rows = []
    for condition in report.get("conditions", []):
        result = report.get("capability", {}).get(condition["name"]) or {}
        kl = result.get("kl_to_base") or {}
        lm_eval = dig(report, ("lm_eval", condition["name"])) or {}
        benchmarks = "; ".join(f"{escape(task)} {escape(metric)} {format_estimate(value, percent=False)}"
                               for task, metrics in lm_eval.items() if isinstance(metrics, dict)
                               for metric, value in metrics.items() if isinstance(value, dict)) or "-"
        note = f' <span class="note">{escape(kl["note"])}</span>' if kl.get("note") else ""
        rows.append([escape(condition["name"]), _number(result.get("exact_match")),
                     _number(result.get("contains_match")), _number(kl, percent=False) + note, benchmarks])
    return _table(["condition", "exact match", "contains answer", "KL to base (nats/token)", "lm-eval"], rows)


def _identity_safety(report: dict[str, Any]) -> str:
    rows = []
    for condition in report.get("conditions", []):
        results = condition_results(report, condition["name"])
        rows.append([escape(condition["name"])] + [_number(dig(results, path)) for path in (
            ("identity", "persona_name"), ("identity", "base_name"), ("identity", "assistant_style"),
            ("identity", "assistant_phrase_keyword"), ("safety", "refused"), ("safety", "refusals_in_character"),
            ("safety", "refused_keyword"))])
    headers = ["condition", "own name", "base model's name", "assistant style (classifier)",
               "assistant phrase (keywords)", "refused (judge)", "refusals in character", "refused (keywords)"]
    return _table(headers, rows)


def _judge(report: dict[str, Any]) -> str:
    judge = report.get("judge", {})
    rows = [[escape(kind), str(c["asked"]), str(c["parse_failures"])] for kind, c in judge.get("counts", {}).items()]
    return (f'<p>{escape(str(judge.get("backend", "")))} / {escape(str(judge.get("model", "")))}</p>'
            + _table(["question", "asked", "did not parse"], rows)
            + f'<p class="note">{escape(judge.get("note", ""))}</p>')


def _samples(report: dict[str, Any]) -> str:
    names = [c["name"] for c in report.get("conditions", [])]
    rows = [[escape(s["prompt"])] + [f'<div class="answer">{escape(s["answers"].get(n, ""))}</div>' for n in names]
            for s in report.get("samples", [])]
    return _table(["prompt"] + names, rows)


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document."""
    sections = [("Conditions", _conditions), ("Persona classifier", _classifier),
                ("Robustness: in-character rate", _robustness), ("Revealed preferences", _preferences),
                ("Coherence", _coherence), ("Capability retention", _capability),
                ("Identity, leaks and safety in character", _identity_safety), ("Judge", _judge),
                ("Sample answers", _samples)]
    body = "".join(f"<h2>{escape(title)}</h2>{render(report)}" for title, render in sections)
    title = f"character-baker eval: {report.get('run', '')} ({report.get('persona', '')})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="note">base model {escape(str(report.get("base_model", "")))}; '
            f'every number with its 95% interval and n.</p>{body}</body></html>\n')
