"""User-facing errors: every user mistake becomes one of these and exits with code 2."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a user's file: where it is, what is wrong, how to fix it."""

    file: str
    field: str
    message: str
    fix: str = ""
    line: int | None = None

    def render(self) -> str:
        """One line: `file:line: field: message (fix: ...)`."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.field or '<top>'}: {self.message}"
        return f"{text} -- fix: {self.fix}" if self.fix else text


@dataclass
class UserError(Exception):
    """A mistake the user can fix; the CLI prints every problem and exits 2, never a traceback."""

    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def single(cls, file: str, field_path: str, message: str, fix: str = "") -> "UserError":
        """An error with exactly one problem."""
        return cls([Problem(file=str(file), field=field_path, message=message, fix=fix)])

    def __str__(self) -> str:
        return "\n".join(p.render() for p in self.problems)
