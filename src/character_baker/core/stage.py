"""The stage contract: `run(ctx) -> StageResult`, shared by every stage and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from character_baker.core.config import Recipe
from character_baker.core.constitution import Constitution
from character_baker.core.runs import RunDir


@dataclass
class StageContext:
    """Everything a stage may read: the run directory, the constitution, the recipe, options."""

    run: RunDir
    constitution: Constitution
    recipe: Recipe
    constitution_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    console: Any = None

    def log(self, message: str) -> None:
        """Print a line through the run's console (or stdout)."""
        if self.console is not None:
            self.console.print(message, markup=False, soft_wrap=True)
        else:
            print(message, flush=True)


@dataclass
class StageResult:
    """What a stage produced: artifact paths (relative to the run), a summary and token counts."""

    stage: str
    artifacts: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tokens_generated: int = 0
    tokens_trained: int = 0


@dataclass(frozen=True)
class Stage:
    """A named stage: its function, the recipe sections and upstream artifacts its inputs hash covers."""

    name: str
    run: Callable[[StageContext], StageResult]
    recipe_sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    option_keys: tuple[str, ...] = ()


def nothing_usable_error(stage: str, output: str, what: str, drops: dict[str, int], fixes: dict[str, str],
                         default_fix: str) -> "UserError":
    """The error of a data stage whose filters left nothing: counts per filter, the fix for the main ones.

    `fixes` maps a filter name to the setting that relieves it; the two filters that dropped most
    are named first. The stage's output file is not promised: nothing usable was written to it.
    """
    from character_baker.core.errors import Problem, UserError

    ranked = sorted(drops.items(), key=lambda item: (-item[1], item[0]))
    counts = ", ".join(f"{name} {count}" for name, count in ranked) or "nothing was generated"
    advice = [fixes[name] for name, _ in ranked[:2] if name in fixes] or [default_fix]
    return UserError([Problem(output, stage, f"no usable {what}: every one was filtered ({counts})",
                              "; or ".join(advice))])
