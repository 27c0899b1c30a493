"""What the HTTP backends (OpenAI-compatible, Anthropic) share: API keys from the environment,
bounded concurrency, retries with exponential backoff and jitter, and progress.

Each request is retried on 408/409/429/5xx, timeouts and dropped connections, up to
`max_retries` times, sleeping base x 2^attempt (capped, scaled by a random factor in [0.5, 1],
or the server's Retry-After when it sends one). A rejected key (401/403) or an unknown model
(404) is a UserError that says how to fix it.
"""

from __future__ import annotations

import os
import random
import time
from abc import abstractmethod
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from character_baker.backends.generation.base import Completion, GenerationBackend, Messages, check_request
from character_baker.backends.generation.progress import ProgressReporter, open_progress
from character_baker.core.errors import UserError

if TYPE_CHECKING:
    from character_baker.core.config import SamplingConfig

T = TypeVar("T")
RETRY_STATUSES = (408, 409, 429)


def api_key_from_env(variable: str | None, default_variable: str | None = None) -> str | None:
    """The key in env var `variable` (UserError if unset); without one, `default_variable`'s value or None."""
    if variable is None:
        return os.environ.get(default_variable) if default_variable else None
    key = os.environ.get(variable)
    if not key:
        raise UserError.single("recipe", "generation.<role>.api_key_env",
                               f"environment variable {variable} is not set (it should hold the API key)",
                               fix=f"export {variable}=<your key>, or set api_key_env to the variable that holds it")
    return key


class HTTPBackend(GenerationBackend):
    """A backend that sends one request per conversation (or per sample) from a thread pool."""

    one_sample_per_request = False  # True: n samples = n requests (APIs without `n`)
    supports_adapters = True  # False: adapter must be None
    supports_label_logprobs = False  # True: the subclass implements _label_logprobs

    def __init__(self, model: str, *, max_concurrency: int = 8, max_retries: int = 4, timeout_s: float = 120.0,
                 retry_base_delay_s: float = 1.0, retry_max_delay_s: float = 30.0):
        self.model_id = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s

    @abstractmethod
    def _complete(self, messages: Messages, sampling: "SamplingConfig", count: int, first_sample: int,
                  adapter: str | None) -> list[Completion]:
        """`count` completions of one conversation (samples first_sample.. of the call)."""

    @abstractmethod
    def _transient_errors(self) -> tuple[type[BaseException], ...]:
        """The SDK's timeout and connection error classes."""

    def generate(self, conversations: list[Messages], sampling: "SamplingConfig", n: int = 1, *,
                 adapter: str | None = None,
                 progress: "str | ProgressReporter | None" = None) -> list[list[Completion]]:
        """n completions per conversation, in input order, at most `max_concurrency` requests in flight."""
        check_request(conversations, n)
        if adapter is not None and not self.supports_adapters:
            raise ValueError(f"the {self.name} backend has no adapters: use adapter=None")
        tasks = ([(index, sample, 1) for index in range(len(conversations)) for sample in range(n)]
                 if self.one_sample_per_request else [(index, 0, n) for index in range(len(conversations))])
        results: list[list[Completion]] = [[] for _ in conversations]
        with open_progress(progress, len(conversations) * n) as reporter:

            def run(index: int, first_sample: int, count: int) -> list[Completion]:
                done = self._complete(conversations[index], sampling, count, first_sample, adapter)
                reporter.advance(len(done), sum(c.completion_tokens for c in done))
                return done

            answered = self.concurrently([lambda task=task: run(*task) for task in tasks])
        for (index, _, _), completions in zip(tasks, answered):
            results[index].extend(completions)
        return results

    def label_logprobs(self, conversations: list[Messages], labels: Any, *,
                       adapter: str | None = None) -> list[dict[str, float] | None] | None:
        """Per conversation, label log-probs from `_label_logprobs` (None when the API has none)."""
        from character_baker.backends.generation.choices import labels_per_conversation

        if not self.supports_label_logprobs:
            return None
        check_request(conversations, 1)
        rows = labels_per_conversation(labels, len(conversations))
        return self.concurrently([lambda c=c, r=r: self._label_logprobs(c, r, adapter)
                                  for c, r in zip(conversations, rows)])

    def _label_logprobs(self, messages: Messages, labels: Sequence[str],
                        adapter: str | None) -> dict[str, float] | None:
        """Label log-probs of one conversation (subclasses with log-probs override this)."""
        raise NotImplementedError

    def concurrently(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run the calls at most `max_concurrency` at a time; results in order; the first failure is raised."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=self.name) as pool:
            futures = [pool.submit(call) for call in calls]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                pool.shutdown(cancel_futures=True)
                raise failed.exception()
            return [future.result() for future in futures]

    def with_retries(self, send: Callable[[], T]) -> T:
        """Call `send`, retrying transient failures with exponential backoff and jitter."""
        for attempt in range(self.max_retries + 1):
            try:
                return send()
            except Exception as error:  # noqa: BLE001 - classified just below
                status = getattr(error, "status_code", None)
                if status in (401, 403, 404):
                    raise self._user_error(status, error) from None
                transient = isinstance(error, self._transient_errors()) or status in RETRY_STATUSES or \
                    (status is not None and status >= 500)
                if not transient or attempt == self.max_retries:
                    raise
                time.sleep(self._backoff(attempt, error))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, error: Exception) -> float:
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), self.retry_max_delay_s)
        return min(self.retry_base_delay_s * 2 ** attempt, self.retry_max_delay_s) * random.uniform(0.5, 1.0)

    def _user_error(self, status: int, error: Exception) -> UserError:
        if status == 404:
            return UserError.single("recipe", "generation.<role>.model",
                                    f"the {self.name} endpoint does not know model {self.model_id!r} ({error})",
                                    fix="check the model name (and base_url) for this role")
        return UserError.single("recipe", "generation.<role>.api_key_env",
                                f"the {self.name} endpoint rejected the API key ({status})",
                                fix="check that api_key_env names a variable holding a valid key")
