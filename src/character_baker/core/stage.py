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
