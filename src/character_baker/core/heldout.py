"""Prompts no training stage sees, for the checks that steer training (monitor) and merging (calibration).

    train, heldout = split_heldout(distill_records, fraction=0.05, seed=0)   # by prompt id
    prompts = held_out_prompts(run, fraction=0.05, seed=0, count=16)          # texts, never eval prompts

Held-out prompts come first from distill's held-out split (the run's own distribution, never
trained on), then from the shipped general prompts this run did not draw. The evaluation set is
never used here, so the numbers eval reports are not the numbers training was steered by.
"""

from __future__ import annotations

import random

from character_baker.core import assets
from character_baker.core.runs import RunDir, read_jsonl

DISTILL_FILE = "data/distill.jsonl"
PROMPTS_FILE = "data/prompts.jsonl"


def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) split of distill records by prompt id, so no held-out prompt is seen in training."""
    prompt_ids = sorted({r["prompt_id"] for r in records})
    count = int(len(prompt_ids) * fraction)
    if fraction > 0 and len(prompt_ids) >= 2:
        count = max(count, 1)
    heldout_ids = set(random.Random(seed).sample(prompt_ids, count))
    return ([r for r in records if r["prompt_id"] not in heldout_ids],
            [r for r in records if r["prompt_id"] in heldout_ids])


def held_out_prompts(run: RunDir, fraction: float, seed: int, count: int) -> list[str]:
    """Prompts no training stage sees: distill's held-out prompts, then shipped general prompts this run lacks."""
    records = read_jsonl(run.path(DISTILL_FILE))
    _, heldout = split_heldout(records, fraction, seed)
    texts = list(dict.fromkeys(r["messages"][0]["content"] for r in heldout if len(r["messages"]) == 1))
    used = {r.get("asset_id") for r in read_jsonl(run.path(PROMPTS_FILE))}
    spare = [item["prompt"] for item in assets.general_prompts() if item["id"] not in used]
    random.Random(seed).shuffle(spare)
    return (texts + spare)[:count]
