"""eval/report.html: one self-contained page (inline CSS and SVG, no scripts, no external files).

Top to bottom: the headline table (per condition: in character plain / under attack / prefill,
looping rate, MC capability, KL to base, each with its change from base, green when better and
red when worse); charts (in-character rate per condition and split with 95% whiskers; looping
rate per condition and answer set; the persona-vs-capability curve of the merge-scale sweep or
calibration, when the run has one); answers of base, prompted and trained side by side (plain,
one break split, the prefill attack); then the details: conditions, persona classifier,
robustness and degeneration tables, revealed preferences, coherence, capability, identity and
safety, the judge.
"""

from __future__ import annotations

from html import escape
from typing import Any, Iterable, Sequence

from character_baker.stages.evaluation.charts import bar_chart, curve_chart, series_for
from character_baker.stages.evaluation.report import (FEELS_LIKE_ME, Cell, condition_results, dig, format_change,
                                                      format_estimate, headline_rows, judge_line)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #e2e2e2;padding:.3rem .5rem;
vertical-align:top;text-align:left}th{background:#f5f5f5}.num{text-align:right;white-space:nowrap}
.up{color:#12733a}.down{color:#a32020}.better{background:#e3f4e8}.worse{background:#fbe4e4}
.change{font-size:.8rem;margin-left:.3rem}.note{color:#666;font-size:.85rem}
.answer{white-space:pre-wrap;max-width:360px;font-size:.82rem}figure.chart{margin:1rem 0}
#headline td,#headline th{font-size:.95rem}
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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
        rows.append([escape(condition["name"]), _number(result.get("plain")), _number(dig(result, ("break", "mean"))),
                     _number(result.get("prefill"))] + [_number(dig(result, ("break", "splits", s))) for s in splits])
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
    rows = [[escape(name), _number(r.get("win_rate")), str(r["wins"]), str(r["losses"]), str(r["invalid"]),
             str(r["inconsistent"]), str(r["unparsed"])] for name, r in coherence.get("comparisons", {}).items()]
    return (f'<p class="note">Win rate against \'{escape(str(coherence.get("reference", "")))}\', both orders, '
            "only order-consistent verdicts.</p>"
            + _table(["condition", "win rate", "wins", "losses", "invalid", "inconsistent", "unparsed"], rows))


def _capability(report: dict[str, Any]) -> str:
    rows, categories = [], []
    for condition in report.get("conditions", []):
        result = report.get("capability", {}).get(condition["name"]) or {}
        categories = categories or sorted(result.get("by_category", {}))
        kl = result.get("kl_to_base") or {}
        lm_eval = dig(report, ("lm_eval", condition["name"])) or {}
        benchmarks = "; ".join(f"{escape(task)} {escape(metric)} {format_estimate(value, percent=False)}"
                               for task, metrics in lm_eval.items() if isinstance(metrics, dict)
                               for metric, value in metrics.items() if isinstance(value, dict)) or "-"
        notes = " ".join(f'<span class="note">{escape(n)}</span>' for n in (result.get("note"), kl.get("note")) if n)
        by_category = [_number(dig(result, ("by_category", c, "mc_accuracy"))) for c in categories]
        rows.append([escape(condition["name"]), _number(result.get("mc_accuracy")),
                     _number(result.get("mc_accuracy_norm")), *by_category, _number(result.get("lenient_match")),
                     _number(kl, percent=False), benchmarks + (" " + notes if notes else "")])
    chance = next((r.get("by_category") for r in report.get("capability", {}).values() if r.get("by_category")), {})
    chance_text = ", ".join(f"{c} {100 * (b.get('chance') or 0):.0f}%" for c, b in chance.items())
    return (_table(["condition", "MC accuracy", "MC length-normalised", *[f"MC {c}" for c in categories],
                    "short answers (lenient)", "KL to base (nats/token)", "lm-eval / notes"], rows)
            + '<p class="note">Multiple choice: our held-out items scored by log-likelihood as lm-evaluation-harness '
              "does (acc = summed log-probability, length-normalised = divided by the choice's length in "
              f"characters). Chance: {escape(chance_text or '-')}. Short answers: first number / yes-no, else the "
              "answer as a whole word.</p>")


def _degeneration(report: dict[str, Any]) -> str:
    measures = ["looping_rate", "rep_2", "rep_4", "distinct_1", "distinct_2", "at_token_limit", "mean_words",
                "mean_tokens"]
    rows = []
    for condition in report.get("conditions", []):
        for answer_set, values in (report.get("degeneration", {}).get(condition["name"]) or {}).items():
            rows.append([escape(condition["name"]), escape(answer_set)]
                        + [_number(values.get(m), percent=m in ("looping_rate", "at_token_limit")) for m in measures])
    return (_table(["condition", "answers", "looping", "rep-2", "rep-4", "distinct-1", "distinct-2", "at token limit",
                    "words", "tokens"], rows)
            + '<p class="note">Looping: share of answers with a word 4-gram said 3+ times. rep-n: Welleck et al. '
              "(2019) seq-rep-n, 1 - unique/all n-grams of an answer, averaged. distinct-n: Li et al. (2016), "
              "distinct/all n-grams over the whole answer set (jackknife interval).</p>")


def _identity_safety(report: dict[str, Any]) -> str:
    rows = []
    for condition in report.get("conditions", []):
        results = condition_results(report, condition["name"])
        rows.append([escape(condition["name"])] + [_number(dig(results, path)) for path in (
            ("identity", "persona_name"), ("identity", "base_name"), ("identity", "assistant_style"),
            ("identity", "assistant_phrase_keyword"), ("safety", "refused"), ("safety", "refusals_in_character"),
            ("safety", "refusals_in_character_judged"), ("safety", "refused_keyword"))])
    headers = ["condition", "own name", "base model's name", "assistant style (classifier)",
               "assistant phrase (keywords)", "refused (judge)", "refusals in character (classifier)",
               "refusals in character (judge)", "refused (keywords)"]
    return _table(headers, rows)


def _judge(report: dict[str, Any]) -> str:
    judge = report.get("judge", {})
    rows = [[escape(kind), str(c["asked"]), str(c.get("constrained", 0)), str(c["parse_failures"])]
            for kind, c in judge.get("counts", {}).items()]
    return (f'<p>{escape(str(judge.get("backend", "")))} / {escape(str(judge.get("model", "")))}: '
            f'{escape(judge_line(report))}</p>'
            + _table(["question", "asked", "constrained (log-probs)", "did not parse"], rows)
            + f'<p class="note">{escape(judge.get("note", ""))}</p>')


def _answer_columns(report: dict[str, Any]) -> list[str]:
    names = [c["name"] for c in report.get("conditions", [])]
    chosen = [n for n in ("base", "prompted", "trained") if n in names]
    return chosen if len(chosen) > 1 else names


def _answers_table(samples: Sequence[dict[str, Any]], names: Sequence[str], first_turn: bool = False) -> str:
    rows = []
    for sample in samples:
        prompt = escape(sample["prompt"])
        if first_turn:
            prompt += (f'<div class="note">turn 1 (base): {escape(sample.get("first_turn", ""))}</div>'
                       '<div class="note">turn 2: Tell me more.</div>')
        rows.append([prompt] + [f'<div class="answer">{escape(sample["answers"].get(n, ""))}</div>' for n in names])
    return _table(["prompt"] + list(names), rows) if rows else '<p class="note">no samples</p>'


def _samples(report: dict[str, Any]) -> str:
    samples, names = report.get("samples") or {}, _answer_columns(report)
    broken = samples.get("break") or {}
    return (f"<h3>Plain prompts</h3>{_answers_table(samples.get('plain', []), names)}"
            f"<h3>Under attack ({escape(str(broken.get('split', '')))}: "
            f"{escape(str(broken.get('instruction', '')))})</h3>{_answers_table(broken.get('items', []), names)}"
            f"<h3>Prefill attack</h3>{_answers_table(samples.get('prefill', []), names, first_turn=True)}")


def _headline_cell(cell: Cell) -> str:
    text = escape(format_estimate(cell.estimate, cell.measure.percent))
    change = format_change(cell.delta, cell.measure.percent)
    css = {True: "better", False: "worse"}.get(cell.better, "")
    arrow = {True: "up", False: "down"}.get(cell.better, "note")
    shown = f'<span class="change {arrow}">({escape(change)})</span>' if change else ""
    return f'<td class="num {css}">{text}{shown}</td>'


def _headline(report: dict[str, Any]) -> str:
    rows = headline_rows(report)
    titles = [cell.measure.title for cell in rows[0][1]] if rows else []
    head = "".join(f"<th>{escape(t)}</th>" for t in ["condition", *titles])
    body = "".join(f"<tr><td>{escape(name)}</td>{''.join(_headline_cell(c) for c in cells)}</tr>"
                   for name, cells in rows)
    return (f'<table id="headline"><tr>{head}</tr>{body}</table><p class="note">In character: persona classifier on '
            "answers with no system prompt; under attack: the 8 break-character instructions pooled; prefill: turn "
            "1 by the base model, then 'Tell me more.'. Looping: answers with a word 4-gram said 3+ times. MC: "
            "held-out multiple choice by log-likelihood. KL to base in nats/token. In brackets the change from "
            f"base (percentage points); green is better, red worse. {escape(judge_line(report))}.</p>")


def _charts(report: dict[str, Any]) -> str:
    names = [c["name"] for c in report.get("conditions", [])]
    series = series_for(names)
    splits = [s["id"] for s in report.get("break_instructions", [])]
    robustness = report.get("robustness", {})
    groups = [("plain", {n: dig(robustness, (n, "plain")) for n in names})]
    groups += [(split, {n: dig(robustness, (n, "break", "splits", split)) for n in names}) for split in splits]
    groups.append(("prefill", {n: dig(robustness, (n, "prefill")) for n in names}))
    in_character = bar_chart("In character, per answer set (95% intervals)", groups, series,
                             chart_id="chart-in-character")
    degeneration = report.get("degeneration", {})
    looping = bar_chart("Looping rate: answers with a word 4-gram said 3+ times (95% intervals)",
                        [(label, {n: dig(degeneration, (n, key, "looping_rate")) for n in names})
                         for key, label in (("plain", "plain"), ("break", "under attack (8 splits)"),
                                            ("prefill", "prefill"))], series, chart_id="chart-looping")
    return in_character + looping + _sweep_chart(report.get("sweep"))


PERSONA_COLUMNS = ("in_character", "persona", "persona_score", "kl_to_base")
CAPABILITY_COLUMNS = ("mc_accuracy", "capability", "top1_agreement")


def _sweep_chart(sweep: dict[str, Any] | None) -> str:
    """The persona-vs-capability curve over merge scales (columns chosen from what the table has)."""
    if not sweep:
        return ('<p class="note">No merge-scale sweep or calibration table in this run '
                "(run `character-baker merge RUN --scales 0.25,0.5,0.75,1.0`).</p>")
    columns = [c for c in sweep.get("columns", []) if c != "scale"]
    x = next((c for c in PERSONA_COLUMNS if c in columns), None)
    y = next((c for c in CAPABILITY_COLUMNS if c in columns and c != x), None)
    rows = [r for r in sweep.get("rows", []) if x and y and r.get(x) is not None and r.get(y) is not None]
    if not rows:
        return f'<p class="note">{escape(sweep.get("source", "sweep"))} has no persona and capability columns.</p>'
    points = [(float(r[x]), float(r[y]), f"scale {r.get('scale', '?')}") for r in rows]
    return curve_chart(f"Persona strength vs capability over merge scales ({sweep.get('source', '')})", points,
                       x, y, chart_id="chart-sweep")


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document."""
    sections = [("Headline", _headline), ("Charts", _charts), ("Answers side by side", _samples),
                ("Conditions", _conditions), ("Persona classifier", _classifier),
                ("Robustness: in-character rate", _robustness), ("Degeneration", _degeneration),
                ("Revealed preferences", _preferences), ("Coherence", _coherence),
                ("Capability retention", _capability), ("Identity, leaks and safety in character", _identity_safety),
                ("Judge", _judge)]
    body = "".join(f"<h2>{escape(title)}</h2>{render(report)}" for title, render in sections)
    title = f"character-baker eval: {report.get('run', '')} ({report.get('persona', '')})"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f'<p class="note">base model {escape(str(report.get("base_model", "")))}; '
            f'every number with its 95% interval and n.</p>{body}</body></html>\n')
