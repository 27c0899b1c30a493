"""eval/report.html in headless Chromium: the headline table and the charts are there, and no label sits on a bar.

The report is rendered from a report dict shaped as the eval stage writes it (every condition, the
eight break splits, degeneration, capability, a merge-scale sweep), with values chosen to stress
the layout: shares of 0 and 1, intervals reaching the ends, long labels.
"""

from __future__ import annotations

import random

import pytest

from character_baker.core import assets
from character_baker.core.stats import mean_estimate, proportion
from character_baker.stages.evaluation.html import render_html
from tests.test_serve_page import NEEDS_BROWSER, browser  # noqa: F401 (the fixture)

pytestmark = NEEDS_BROWSER
CONDITIONS = ["base", "prompted", "distilled", "trained"]


def share(rng: random.Random, n: int = 40) -> dict:
    return proportion(rng.choice([0, n, rng.randint(0, n)]), n).to_dict()


def synthetic_report() -> dict:
    """A report with every section the page draws, for four conditions."""
    rng = random.Random(3)
    splits = [s["id"] for s in assets.break_character_instructions()]
    report = {"run": "pirate", "persona": "Captain Rook", "base_model": "tiny",
              "conditions": [{"name": n, "kind": n, "model": "tiny", "adapter": None, "system_prompt": n == "prompted",
                              "backend": "hf"} for n in CONDITIONS],
              "break_instructions": assets.break_character_instructions(), "skipped_conditions": {},
              "classifier": {"f1": {"value": 0.9, "n": 40, "ci": [0.8, 0.95]}, "labels": ["assistant", "rook"]},
              "judge": {"backend": "hf", "model": "tiny", "note": "weak judge",
                        "counts": {"trait": {"asked": 12, "parse_failures": 0, "constrained": 12}}},
              "sweep": {"source": "logs/merge_sweep.json", "columns": ["scale", "kl_to_base", "top1_agreement"],
                        "rows": [{"scale": s, "kl_to_base": 0.1 * s, "top1_agreement": 1 - 0.2 * s}
                                 for s in (0.25, 0.5, 0.75, 1.0)]}}
    report["robustness"] = {n: {"plain": share(rng), "prefill": share(rng),
                                "break": {"mean": share(rng), "splits": {s: share(rng, 5) for s in splits}}}
                            for n in CONDITIONS}
    report["degeneration"] = {n: {key: {"looping_rate": share(rng), "rep_4": mean_estimate([0.1, 0.4, 0.2]).to_dict()}
                                  for key in ("plain", *splits, "break", "prefill")} for n in CONDITIONS}
    report["capability"] = {n: {"mc_accuracy": share(rng, 300), "mc_accuracy_norm": share(rng, 300),
                                "kl_to_base": mean_estimate([0.0] if n == "base" else [0.2, 0.3]).to_dict()}
                            for n in CONDITIONS}
    answers = {n: f"{n} says: arr, the tide turns twice a day." for n in CONDITIONS}
    report["samples"] = {"plain": [{"prompt": "How do tides work?", "category": "science", "answers": answers}],
                         "break": {"split": "break-0", "instruction": "Answer plainly.",
                                   "items": [{"prompt": "How do tides work?\nAnswer plainly.", "answers": answers}]},
                         "prefill": [{"prompt": "How do tides work?", "first_turn": "The moon.", "answers": answers}]}
    return report


def boxes(driver, chart_id: str, selector: str) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => {const r = e.getBoundingClientRect();"
        " return {x: r.left, y: r.top, w: r.width, h: r.height, text: e.textContent};});",
        f"#{chart_id} {selector}")


def overlap(a: dict, b: dict, slack: float = 0.5) -> bool:
    return (a["x"] + slack < b["x"] + b["w"] and b["x"] + slack < a["x"] + a["w"]
            and a["y"] + slack < b["y"] + b["h"] and b["y"] + slack < a["y"] + a["h"])


def test_report_opens_with_the_headline_and_charts_whose_labels_never_cover_a_bar(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    page = tmp_path / "report.html"
    page.write_text(render_html(synthetic_report()), encoding="utf-8")
    browser.set_window_size(1300, 1000)
    browser.get(page.as_uri())
    headline = browser.find_element(By.ID, "headline")
    rows = headline.find_elements(By.TAG_NAME, "tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:]] == CONDITIONS
    assert "looping" in rows[0].text and "MC capability" in rows[0].text and "KL to base" in rows[0].text
    assert headline.find_elements(By.CSS_SELECTOR, "td.better, td.worse")  # changes from base are coloured
    first_chart = browser.find_element(By.CSS_SELECTOR, "figure.chart")
    assert headline.location["y"] < first_chart.location["y"]  # the headline comes first
    for chart_id in ("chart-in-character", "chart-looping"):
        bars, whiskers = boxes(browser, chart_id, ".bar"), boxes(browser, chart_id, ".whisker")
        labels = boxes(browser, chart_id, "text")
        assert len(bars) >= len(CONDITIONS) * 3 and whiskers and len(labels) > len(bars)
        assert any(b["w"] > 0 for b in bars)
        for label in labels:
            for shape in bars + whiskers:
                assert not overlap(label, shape), (chart_id, label, shape)
    sweep = browser.find_element(By.ID, "chart-sweep")
    assert len(sweep.find_elements(By.TAG_NAME, "circle")) == 4 and "scale 0.5" in sweep.text
    assert "Answers side by side" in browser.find_element(By.TAG_NAME, "body").text
