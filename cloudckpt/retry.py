"""The one retry policy (tenacity) and the one classifier deciding what is worth retrying.

Backends translate client errors into :mod:`cloudckpt.errors` types first; the classifier then
decides by type alone, never by message text:

* retried: :class:`~cloudckpt.errors.TransientStorageError` (5xx, 429/503 throttling, request
  timeouts, connection resets) and the builtin ``ConnectionError`` / ``TimeoutError``;
* never retried: everything else, notably permission (401/403), not-found (404), bad request
  (400, EntityTooSmall) and precondition failures.

The effective policy of one request is: at most ``max_attempts`` attempts, stopping early once
``deadline_secs`` have passed since the first; between attempts a full-jitter exponential
backoff ``uniform(0, min(max_backoff, initial * 2**n))``. Client libraries' own retries are
turned off by the backends so attempts do not multiply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from .config import RetryConfig
from .errors import RetriesExhaustedError, TransientStorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def is_retryable(exc: BaseException) -> bool:
    """True for failures that a later identical request may not hit (see module docstring)."""
    if isinstance(exc, TransientStorageError):
        return True
    return isinstance(exc, ConnectionError | TimeoutError) and not isinstance(
        exc, PermissionError | FileNotFoundError
    )


class RetryPolicy:
    """Runs a callable under :class:`RetryConfig`; ``sleep`` is injectable so tests never wait."""

    def __init__(
        self,
        config: RetryConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._sleep = sleep

    def _stop(self) -> tenacity.stop.stop_base:
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.config.max_attempts)
        if self.config.deadline_secs is not None:
            stop = stop | tenacity.stop_after_delay(self.config.deadline_secs)
        return stop

    def _wait(self) -> tenacity.wait.wait_base:
        return tenacity.wait_random_exponential(
            multiplier=self.config.initial_backoff_secs, max=self.config.max_backoff_secs
        )

    def call(
        self,
        fn: Callable[[], T],
        *,
        url: str,
        what: str,
        rank: int | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, fails with a non-retryable error (re-raised as is),
        or the policy gives up (RetriesExhaustedError naming ``url``, ``what`` and attempts).
        ``on_retry`` sees each failure that will be retried (for metrics)."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.warning(
                "retrying %s of %s: attempt %d failed with %s: %s",
                what,
                url,
                state.attempt_number,
                type(exc).__name__,
                exc,
            )
            if on_retry is not None and exc is not None:
                on_retry(exc)

        retrying = tenacity.Retrying(
            stop=self._stop(),
            wait=self._wait(),
            retry=tenacity.retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=False,
        )
        try:
            return retrying(fn)
        except tenacity.RetryError as e:
            last = e.last_attempt.exception()
            attempts = e.last_attempt.attempt_number
            raise RetriesExhaustedError(
                f"{what} of {url} failed after {attempts} attempts; last error: "
                f"{type(last).__name__}: {last}",
                attempts=attempts,
                url=url,
                rank=rank,
                hint="the store kept failing or throttling; check its health or raise "
                "RetryConfig.max_attempts / deadline_secs",
            ) from last

