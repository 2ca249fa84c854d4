"""cloudckpt.errors: one root, builtin bases where they fit, messages with URL/rank/hint, and
every class picklable with its fields (errors cross the writer-subprocess pipe)."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest

from cloudckpt import errors
from cloudckpt.errors import (
    BadRequestError,
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CloudCkptError,
    CommitConflictError,
    CorruptCheckpointError,
    ManifestError,
    NotFoundError,
    ObjectChangedError,
    PermissionDeniedError,
    PreconditionFailedError,
    RetriesExhaustedError,
    SaveFailedError,
    StateDictMismatchError,
    StorageError,
    ThrottledError,
    TransientStorageError,
    UnsupportedURLError,
)

ALL_ERRORS = sorted(
    (
        cls
        for cls in vars(errors).values()
        if inspect.isclass(cls) and issubclass(cls, CloudCkptError)
    ),
    key=lambda c: c.__name__,
)


def make(cls: type[CloudCkptError], message: str = "it broke", **kwargs: object) -> CloudCkptError:
    if issubclass(cls, RetriesExhaustedError):
        kwargs.setdefault("attempts", 4)
    return cls(message, **kwargs)  # type: ignore[arg-type]


def test_every_error_class_is_found() -> None:
    assert len(ALL_ERRORS) >= 20
    assert RetriesExhaustedError in ALL_ERRORS


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (NotFoundError, (FileNotFoundError, OSError, StorageError)),
        (BucketNotFoundError, (NotFoundError, FileNotFoundError, StorageError)),
        (CheckpointNotFoundError, (FileNotFoundError, CheckpointError)),
        (PermissionDeniedError, (PermissionError, OSError, StorageError)),
        (StateDictMismatchError, (RuntimeError, CheckpointError)),
        (UnsupportedURLError, (ValueError,)),
        (ThrottledError, (TransientStorageError, StorageError)),
        (RetriesExhaustedError, (StorageError,)),
        (ObjectChangedError, (PreconditionFailedError, StorageError)),
        (CommitConflictError, (PreconditionFailedError, StorageError)),
        (ChecksumMismatchError, (CorruptCheckpointError, CheckpointError)),
        (ManifestError, (CorruptCheckpointError, CheckpointError)),
        (SaveFailedError, (CheckpointError,)),
        (BadRequestError, (StorageError,)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_hierarchy(cls: type[CloudCkptError], bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base), base
    assert issubclass(cls, CloudCkptError)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_all_are_plain_exceptions_under_one_root(cls: type[CloudCkptError]) -> None:
    assert issubclass(cls, CloudCkptError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    "cls",
    [TransientStorageError, BadRequestError, PreconditionFailedError, CorruptCheckpointError],
    ids=lambda c: c.__name__,
)
def test_only_the_documented_builtin_bases(cls: type[CloudCkptError]) -> None:
    assert not issubclass(cls, OSError | ValueError | RuntimeError)


def test_builtin_handlers_catch_them() -> None:
    with pytest.raises(FileNotFoundError):
        raise BucketNotFoundError("no bucket", url="s3://nope/x")
    with pytest.raises(FileNotFoundError):
        raise CheckpointNotFoundError("no manifest", url="s3://b/ckpt")
    with pytest.raises(PermissionError):
        raise PermissionDeniedError("denied", url="gs://b/k")
    with pytest.raises(ValueError):
        raise UnsupportedURLError("bad scheme", url="ftp://x")
    with pytest.raises(RuntimeError):
        raise StateDictMismatchError("missing keys")


# --- messages ------------------------------------------------------------------------------


def test_message_names_url_rank_and_hint() -> None:
    err = NotFoundError("object is missing", url="s3://bucket/ckpt/x.pt", rank=3, hint="check it")
    text = str(err)
    assert text.startswith("object is missing")
    assert "s3://bucket/ckpt/x.pt" in text
    assert "rank 3" in text
    assert text.endswith("Hint: check it")
    assert (err.message, err.url, err.rank, err.hint) == (
        "object is missing",
        "s3://bucket/ckpt/x.pt",
        3,
        "check it",
    )


def test_url_already_in_the_message_is_not_repeated() -> None:
    err = StorageError("GET s3://b/k failed", url="s3://b/k")
    assert str(err).count("s3://b/k") == 1


def test_rank_zero_is_shown_and_missing_fields_are_omitted() -> None:
    assert "rank 0" in str(SaveFailedError("failed", rank=0))
    assert str(CloudCkptError("plain")) == "plain"
    bare = CloudCkptError("plain")
    assert (bare.url, bare.rank, bare.hint) == (None, None, None)
    assert "Hint" not in str(CloudCkptError("plain", hint=""))


def test_retries_exhausted_keeps_attempts() -> None:
    err = RetriesExhaustedError("PUT failed", attempts=6, url="gs://b/k", rank=1)
    assert err.attempts == 6
    assert "gs://b/k" in str(err)
    assert "rank 1" in str(err)


# --- pickling ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "fields",
    [
        {"url": "s3://bucket/prefix/checkpoint_2.pt", "rank": 2, "hint": "retry the save"},
        {"url": None, "rank": 0, "hint": None},
        {},
    ],
    ids=["all-fields", "rank-zero", "no-fields"],
)
def test_pickle_round_trip_keeps_type_message_and_fields(
    cls: type[CloudCkptError], fields: dict[str, object]
) -> None:
    err = make(cls, "upload of part 7 failed", **fields)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        copy_ = pickle.loads(pickle.dumps(err, protocol=protocol))
        assert type(copy_) is cls
        assert str(copy_) == str(err)
        assert copy_.args == err.args
        assert copy_.message == err.message == "upload of part 7 failed"
        assert (copy_.url, copy_.rank, copy_.hint) == (err.url, err.rank, err.hint)
        if isinstance(err, RetriesExhaustedError):
            assert copy_.attempts == err.attempts == 4
        with pytest.raises(cls):
            raise copy_


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_copy_keeps_fields(cls: type[CloudCkptError]) -> None:
    err = make(cls, "boom", url="memory://b/k", rank=5, hint="h")
    dup = copy.copy(err)
    assert type(dup) is cls
    assert (dup.message, dup.url, dup.rank, dup.hint) == ("boom", "memory://b/k", 5, "h")
    assert str(dup) == str(err)


def test_pickled_oserror_subclasses_stay_catchable_as_builtins() -> None:
    err = pickle.loads(pickle.dumps(BucketNotFoundError("no bucket", url="s3://x/y")))
    with pytest.raises(FileNotFoundError):
        raise err
    perm = pickle.loads(pickle.dumps(PermissionDeniedError("denied", url="s3://x/y", rank=1)))
    assert isinstance(perm, PermissionError)
    assert "rank 1" in str(perm)
