"""The held-out prompt sets every condition answers: drawn from shipped evaluation assets plus user files.

| set | source | size |
|---|---|---|
| plain | eval prompts of every category except identity and harmful (stratified) + every user prompt | `eval.prompts` + users' |
| robustness | the first plain prompts, each with a break-character suffix / under the prefill attack | `eval.robustness_prompts` |
| identity | eval prompts of category identity | `eval.identity_prompts` |
| harmful | eval prompts of category harmful | `eval.harmful_prompts` |
| neutral | eval prompts of factual categories (KL to the base model) | `eval.kl_prompts` |
| preference | eval prompts except harmful, each paired with two random traits | `eval.elo_pairs` per instruction |
| capability | short-answer arithmetic/knowledge items (stratified by kind), answered and leniently matched | `eval.capability_items` |
| multiple_choice | held-out multiple-choice items (stratified by category), scored by log-likelihood | `eval.mc_items` |

The shipped eval prompts never appear in training data. Samples are seeded (`eval.seed`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from character_baker.core import assets
from character_baker.core.config import EvalConfig
from character_baker.core.errors import Problem, UserError
from character_baker.core.runs import stable_hash
from character_baker.core.userfiles import parse_json, user_text_lines

OWN_MEASURE_CATEGORIES = ("identity", "harmful")
NEUTRAL_CATEGORIES = ("math_reasoning", "science", "coding", "household", "recipes")
USER_CATEGORY = "user"
PROMPT_LINE_FIX = 'write one object per line, e.g. {"prompt": "How do tides work?"}'


@dataclass(frozen=True)
class PromptSets:
    """Every prompt set of one evaluation (records `{id, prompt, category}`, capability items as shipped)."""

    plain: list[dict]
    identity: list[dict]
    harmful: list[dict]
    neutral: list[dict]
    preference: list[dict]
    capability: list[dict]
    multiple_choice: list[dict]

    def sizes(self) -> dict[str, int]:
        """How many prompts each set holds."""
        return {name: len(getattr(self, name)) for name in
                ("plain", "identity", "harmful", "neutral", "preference", "capability", "multiple_choice")}


def stratified_sample(records: Sequence[dict], count: int, seed: int, key: str = "category") -> list[dict]:
    """`count` records taken round-robin over the values of `key`, each group shuffled with `seed`."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record[key], []).append(record)
    rng = random.Random(seed)
    for group in groups.values():
        rng.shuffle(group)
    picked: list[dict] = []
    queues = [groups[name] for name in sorted(groups)]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def read_prompt_file(path: str | Path) -> list[dict]:
    """User prompts from a .txt file (one per line) or a .jsonl file (objects with a 'prompt' string)."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError.single(str(path), "--prompts", f"unsupported file type '{path.suffix}'",
                               "use a .txt file (one prompt per line) or .jsonl (objects with a 'prompt' key)")
    texts = []
    for number, line in user_text_lines(path, field="--prompts"):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line.strip())
            continue
        record = parse_json(line, file=path, field=f"line {number}", line=number, fix=PROMPT_LINE_FIX)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError([Problem(str(path), f"line {number}", "not a JSON object with a 'prompt' string",
                                     PROMPT_LINE_FIX, number)])
        texts.append(record["prompt"])
    return [{"id": f"user-{stable_hash([str(path), text], 12)}", "prompt": text, "category": USER_CATEGORY}
            for text in texts if isinstance(text, str) and text.strip()]


def _category(records: Sequence[dict], names: Sequence[str], count: int, seed: int) -> list[dict]:
    return stratified_sample([r for r in records if r["category"] in names], count, seed)


def build_prompt_sets(cfg: EvalConfig, prompt_files: Sequence[str | Path] = ()) -> PromptSets:
    """Every held-out prompt set for the recipe's sizes, plus the prompts of the user's files."""
    shipped = assets.eval_prompts()
    general = [r for r in shipped if r["category"] not in OWN_MEASURE_CATEGORIES]
    user = [record for path in prompt_files for record in read_prompt_file(path)]
    capability = stratified_sample(assets.capability_items(), cfg.capability_items or 10**9, cfg.seed, key="kind")
    multiple_choice = stratified_sample(assets.multiple_choice_items(), cfg.mc_items or 10**9, cfg.seed, key="category")
    return PromptSets(
        plain=stratified_sample(general, cfg.prompts, cfg.seed) + user,
        identity=_category(shipped, ["identity"], cfg.identity_prompts, cfg.seed),
        harmful=_category(shipped, ["harmful"], cfg.harmful_prompts, cfg.seed),
        neutral=_category(shipped, NEUTRAL_CATEGORIES, cfg.kl_prompts, cfg.seed),
        preference=[r for r in shipped if r["category"] != "harmful"],
        capability=capability, multiple_choice=multiple_choice)
