"""cloudckpt.retry: the classifier and the tenacity policy, with an injected sleep and a fake
clock so that nothing ever waits."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import pytest
import tenacity

from cloudckpt.config import RetryConfig
from cloudckpt.errors import (
    BadRequestError,
    BucketNotFoundError,
    CheckpointNotFoundError,
    CommitConflictError,
    CorruptCheckpointError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    RetriesExhaustedError,
    StorageError,
    ThrottledError,
    TransientStorageError,
)
from cloudckpt.retry import RetryPolicy, is_retryable

URL = "s3://bucket/ckpt/step_10/checkpoint_0.pt"


# --- classifier ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        TransientStorageError("503", url=URL),
        ThrottledError("SlowDown", url=URL),
        ConnectionError("reset"),
        ConnectionResetError("reset by peer"),
        ConnectionRefusedError("refused"),
        BrokenPipeError("pipe"),
        TimeoutError("read timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_retryable(exc: BaseException) -> None:
    assert is_retryable(exc) is True


@pytest.mark.parametrize(
    "exc",
    [
        PermissionDeniedError("403", url=URL),
        NotFoundError("404", url=URL),
        BucketNotFoundError("no bucket", url=URL),
        CheckpointNotFoundError("no manifest", url=URL),
        BadRequestError("EntityTooSmall", url=URL),
        PreconditionFailedError("412", url=URL),
        CommitConflictError("exists", url=URL),
        ObjectChangedError("changed", url=URL),
        CorruptCheckpointError("bad crc", url=URL),
        RetriesExhaustedError("gave up", attempts=6, url=URL),
        StorageError("generic", url=URL),
        ValueError("bad argument"),
        RuntimeError("bug"),
        OSError("disk full"),
        PermissionError("denied"),
        FileNotFoundError("gone"),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_not_retryable(exc: BaseException) -> None:
    assert is_retryable(exc) is False


# --- policy --------------------------------------------------------------------------------


class SleepRecorder:
    def __init__(self, clock: FakeClock | None = None) -> None:
        self.sleeps: list[float] = []
        self.clock = clock

    def __call__(self, secs: float) -> None:
        self.sleeps.append(secs)
        if self.clock is not None:
            self.clock.now += secs


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """tenacity reads ``time.monotonic`` for its deadline; give it a clock we move by hand."""
    fake = FakeClock()
    monkeypatch.setattr(tenacity, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


class Flaky:
    """Fails with ``errors`` in turn, then returns ``result``."""

    def __init__(
        self,
        errors: list[BaseException],
        result: Any = "ok",
        step: Callable[[], None] | None = None,
    ) -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0
        self.step = step

    def __call__(self) -> Any:
        self.calls += 1
        if self.step is not None:
            self.step()
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def policy(sleep: SleepRecorder, **kwargs: Any) -> RetryPolicy:
    defaults: dict[str, Any] = {
        "max_attempts": 6,
        "initial_backoff_secs": 0.5,
        "max_backoff_secs": 3.0,
        "deadline_secs": None,
    }
    defaults.update(kwargs)
    return RetryPolicy(RetryConfig(**defaults), sleep=sleep)


@pytest.mark.parametrize("failures", [0, 1, 3, 5])
def test_succeeds_after_n_transient_failures_with_n_bounded_sleeps(failures: int) -> None:
    sleep = SleepRecorder()
    fn = Flaky([TransientStorageError(f"503 #{i}", url=URL) for i in range(failures)], "value")
    assert policy(sleep).call(fn, url=URL, what="upload part 3") == "value"
    assert fn.calls == failures + 1
    assert len(sleep.sleeps) == failures
    for n, secs in enumerate(sleep.sleeps):
        # full jitter: uniform(0, min(max_backoff, initial * 2**n))
        assert 0.0 <= secs <= min(3.0, 0.5 * 2**n), (n, secs)


def test_backoffs_never_exceed_max_backoff() -> None:
    sleep = SleepRecorder()
    fn = Flaky([ConnectionResetError("reset")] * 39)
    policy(sleep, max_attempts=40, initial_backoff_secs=1.0, max_backoff_secs=2.5).call(
        fn, url=URL, what="GET"
    )
    assert len(sleep.sleeps) == 39
    assert all(0.0 <= s <= 2.5 for s in sleep.sleeps)
    assert max(sleep.sleeps) > 0  # jittered, not all zero


def test_zero_initial_backoff_never_sleeps_a_positive_time() -> None:
    sleep = SleepRecorder()
    fn = Flaky([TimeoutError("t")] * 3)
    policy(sleep, initial_backoff_secs=0.0).call(fn, url=URL, what="GET")
    assert sleep.sleeps == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "error",
    [
        PermissionDeniedError("403 AccessDenied", url=URL),
        NotFoundError("404", url=URL),
        BadRequestError("400", url=URL),
        PreconditionFailedError("412", url=URL),
        CommitConflictError("exists", url=URL),
        ValueError("bad"),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_non_retryable_error_is_raised_unchanged_after_one_call(error: BaseException) -> None:
    sleep = SleepRecorder()
    seen: list[BaseException] = []
    fn = Flaky([error])
    with pytest.raises(type(error)) as excinfo:
        policy(sleep).call(fn, url=URL, what="PUT", on_retry=seen.append)
    assert excinfo.value is error
    assert fn.calls == 1
    assert sleep.sleeps == []
    assert seen == []


def test_non_retryable_error_after_transient_ones_is_raised_unchanged() -> None:
    sleep = SleepRecorder()
    denied = PermissionDeniedError("403", url=URL)
    fn = Flaky([ThrottledError("SlowDown", url=URL), denied])
    with pytest.raises(PermissionDeniedError) as excinfo:
        policy(sleep).call(fn, url=URL, what="PUT")
    assert excinfo.value is denied
    assert fn.calls == 2
    assert len(sleep.sleeps) == 1


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_exhaustion_raises_retries_exhausted(max_attempts: int) -> None:
    sleep = SleepRecorder()
    errors = [TransientStorageError(f"503 #{i}", url=URL) for i in range(max_attempts)]
    fn = Flaky(list(errors))
    with pytest.raises(RetriesExhaustedError) as excinfo:
        policy(sleep, max_attempts=max_attempts).call(fn, url=URL, what="upload part 7", rank=3)
    err = excinfo.value
    assert err.attempts == max_attempts
    assert fn.calls == max_attempts
    assert len(sleep.sleeps) == max_attempts - 1
    assert err.__cause__ is errors[-1]
    assert err.url == URL
    assert err.rank == 3
    text = str(err)
    assert URL in text
    assert "upload part 7" in text
    assert f"{max_attempts} attempts" in text
    assert f"503 #{max_attempts - 1}" in text  # the last error
    assert "rank 3" in text
    assert err.hint and "max_attempts" in err.hint


def test_deadline_stops_retrying_on_a_fake_clock(clock: FakeClock) -> None:
    """Each attempt takes 10 s on the fake clock; a 25 s deadline allows three attempts."""
    sleep = SleepRecorder(clock)

    def ten_seconds() -> None:
        clock.now += 10.0

    fn = Flaky([TransientStorageError("503", url=URL)] * 100, step=ten_seconds)
    retry = policy(sleep, max_attempts=100, initial_backoff_secs=0.0, deadline_secs=25.0)
    with pytest.raises(RetriesExhaustedError) as excinfo:
        retry.call(fn, url=URL, what="GET")
    assert excinfo.value.attempts == 3
    assert fn.calls == 3
    assert sleep.sleeps == [0.0, 0.0]


def test_deadline_counts_backoff_sleeps_too(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempts take no time; every jittered backoff draws its upper bound (8 s): the 9th
    attempt ends 64 s after the first, past the 60 s deadline."""
    monkeypatch.setattr(tenacity.wait, "random", types.SimpleNamespace(uniform=lambda a, b: b))
    sleep = SleepRecorder(clock)
    fn = Flaky([TransientStorageError("503", url=URL)] * 100)
    retry = policy(
        sleep, max_attempts=100, initial_backoff_secs=8.0, max_backoff_secs=8.0, deadline_secs=60.0
    )
    with pytest.raises(RetriesExhaustedError) as excinfo:
        retry.call(fn, url=URL, what="GET")
    assert sleep.sleeps == [8.0] * 8
    assert excinfo.value.attempts == fn.calls == 9


def test_backoff_upper_bound_doubles_until_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenacity.wait, "random", types.SimpleNamespace(uniform=lambda a, b: b))
    sleep = SleepRecorder()
    fn = Flaky([TimeoutError("t")] * 6)
    policy(sleep, max_attempts=7, initial_backoff_secs=0.25, max_backoff_secs=3.0).call(
        fn, url=URL, what="GET"
    )
    assert sleep.sleeps == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_without_deadline_only_attempts_count(clock: FakeClock) -> None:
    sleep = SleepRecorder(clock)

    def an_hour() -> None:
        clock.now += 3600.0

    fn = Flaky([TimeoutError("slow")] * 10, step=an_hour)
    with pytest.raises(RetriesExhaustedError) as excinfo:
        policy(sleep, max_attempts=4, deadline_secs=None).call(fn, url=URL, what="GET")
    assert excinfo.value.attempts == 4
    assert fn.calls == 4


def test_on_retry_sees_each_retried_failure() -> None:
    sleep = SleepRecorder()
    errors: list[BaseException] = [
        ThrottledError("SlowDown", url=URL),
        ConnectionResetError("reset"),
        TimeoutError("timeout"),
    ]
    seen: list[BaseException] = []
    fn = Flaky(list(errors), result=42)
    assert policy(sleep).call(fn, url=URL, what="GET", on_retry=seen.append) == 42
    assert seen == errors
    assert all(a is b for a, b in zip(seen, errors, strict=True))


def test_on_retry_does_not_see_the_final_failure() -> None:
    sleep = SleepRecorder()
    errors = [TransientStorageError(str(i), url=URL) for i in range(3)]
    seen: list[BaseException] = []
    with pytest.raises(RetriesExhaustedError):
        policy(sleep, max_attempts=3).call(
            Flaky(list(errors)), url=URL, what="GET", on_retry=seen.append
        )
    assert seen == errors[:2]


def test_a_warning_per_retry_names_url_and_attempt(caplog: pytest.LogCaptureFixture) -> None:
    sleep = SleepRecorder()
    fn = Flaky([ThrottledError("SlowDown", url=URL), TimeoutError("read timeout")])
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.retry"):
        policy(sleep).call(fn, url=URL, what="upload part 9")
    records = [r for r in caplog.records if r.name == "cloudckpt.retry"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in records)
    assert URL in first and URL in second
    assert "upload part 9" in first
    assert "attempt 1" in first and "ThrottledError" in first
    assert "attempt 2" in second and "TimeoutError" in second


def test_no_warning_without_retry(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="cloudckpt.retry"):
        assert policy(SleepRecorder()).call(lambda: 1, url=URL, what="HEAD") == 1
    assert [r for r in caplog.records if r.name == "cloudckpt.retry"] == []


def test_policy_is_reusable_and_keeps_its_config() -> None:
    sleep = SleepRecorder()
    cfg = RetryConfig(max_attempts=2, initial_backoff_secs=0.0, deadline_secs=None)
    retry = RetryPolicy(cfg, sleep=sleep)
    assert retry.config is cfg
    for _ in range(3):
        assert retry.call(Flaky([TimeoutError("t")], result="x"), url=URL, what="GET") == "x"
    assert len(sleep.sleeps) == 3
