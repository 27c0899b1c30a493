"""Benchmarks through lm-evaluation-harness (`--lm-eval TASKS`), when the `lm-eval` package is installed.

Each condition that is a model folder (+ adapter) is evaluated with the harness's `hf` model:
`pretrained` = the model, `peft` = the condition's adapter, the condition's system prompt as the
harness's system instruction, the chat template applied. Every metric comes back with the
harness's own standard error, turned into a normal 95% interval, and the number of samples.
The harness loads its own copy of each model (it cannot reuse ours).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Sequence

from character_baker.core.errors import UserError
from character_baker.core.stats import Z95

if TYPE_CHECKING:
    from character_baker.core.config import ModelsConfig
    from character_baker.stages.evaluation.conditions import Condition

PACKAGE = "lm-eval"


def parse_tasks(text: str | None) -> list[str]:
    """'hellaswag, arc_easy' -> ['hellaswag', 'arc_easy'] (empty for None)."""
    return [task.strip() for task in (text or "").split(",") if task.strip()]


def require_lm_eval() -> None:
    """Raise a UserError naming the package when lm-evaluation-harness is not importable."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError.single("--lm-eval", "lm_eval", "lm-evaluation-harness is not installed",
                               f"pip install '{PACKAGE}[hf]' (or drop --lm-eval)")


def metrics_with_intervals(task_results: dict[str, Any], samples: int) -> dict[str, dict[str, Any]]:
    """Harness metrics {'acc,none': v, 'acc_stderr,none': se} -> {'acc': {value, n, se, ci}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in task_results.items():
        metric, _, _filter = key.partition(",")
        if "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        se = task_results.get(f"{metric}_stderr,{_filter}" if _filter else f"{metric}_stderr")
        se = se if isinstance(se, (int, float)) else None
        out[metric] = {"value": float(value), "n": samples, "se": se,
                       "ci": [value - Z95 * se, value + Z95 * se] if se is not None else None}
    return out


def _model_args(condition: "Condition", models: "ModelsConfig") -> dict[str, Any]:
    from character_baker.backends.models import resolve_model

    args: dict[str, Any] = {"pretrained": str(resolve_model(condition.model_ref,
                                                             trust_remote_code=models.trust_remote_code)),
                            "dtype": models.dtype, "trust_remote_code": models.trust_remote_code}
    if condition.adapter_path:
        args["peft"] = condition.adapter_path
    return args


def run_lm_eval(conditions: Sequence["Condition"], tasks: Sequence[str], models: "ModelsConfig",
                device: str) -> dict[str, Any]:
    """Per condition (steered is skipped: the harness cannot steer), per task: metrics with intervals."""
    require_lm_eval()
    import lm_eval

    results: dict[str, Any] = {}
    for condition in conditions:
        if condition.kind == "steered":
            results[condition.name] = {"skipped": "the harness cannot apply steering"}
            continue
        output = lm_eval.simple_evaluate(model="hf", model_args=_model_args(condition, models), tasks=list(tasks),
                                         batch_size="auto", device=device, apply_chat_template=True,
                                         system_instruction=condition.system_prompt)
        samples = output.get("n-samples", {})
        results[condition.name] = {task: metrics_with_intervals(values, samples.get(task, {}).get("effective", 0))
                                   for task, values in output.get("results", {}).items()}
    return results
