"""The cloudckpt exception hierarchy: one root, messages that name the URL, the rank and a hint.

Backends translate their client's errors into these classes (``raise ... from e``) so that the
rest of the package, and the retry classifier, only ever look at types, never at message text.
"""

from __future__ import annotations


class CloudCkptError(Exception):
    """Root of every error cloudckpt raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        rank: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.url = url
        self.rank = rank
        self.hint = hint
        parts = [message]
        if url is not None and url not in message:
            parts.append(f"(url: {url})")
        if rank is not None:
            parts.append(f"(rank {rank})")
        text = " ".join(parts)
        if hint:
            text = f"{text}. Hint: {hint}"
        self.message = message
        super().__init__(text)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Errors cross the writer-subprocess pipe: keep them picklable with their fields.
        return (_rebuild_error, (type(self), self.message, self.url, self.rank, self.hint))


def name_rank(error: BaseException, rank: int) -> None:
    """Add ``rank`` to a cloudckpt error raised without one (storage errors do not know it)."""
    if isinstance(error, CloudCkptError) and error.rank is None:
        CloudCkptError.__init__(error, error.message, url=error.url, rank=rank, hint=error.hint)


def _rebuild_error(
    cls: type[CloudCkptError], message: str, url: str | None, rank: int | None, hint: str | None
) -> CloudCkptError:
    err = cls.__new__(cls)
    CloudCkptError.__init__(err, message, url=url, rank=rank, hint=hint)
    return err


class UnsupportedURLError(CloudCkptError, ValueError):
    """The URL's scheme has no backend, or the URL is malformed."""


# --- storage errors (raised by backends) -------------------------------------------------


class StorageError(CloudCkptError):
    """A request to the object store failed."""


class TransientStorageError(StorageError):
    """A failure worth retrying: 5xx, throttling, timeouts, connection resets."""


class ThrottledError(TransientStorageError):
    """The store asked us to slow down (503 SlowDown, 429)."""


class RetriesExhaustedError(StorageError):
    """A retryable request kept failing until the retry policy gave up."""

    def __init__(self, message: str, *, attempts: int, **kwargs: object) -> None:
        self.attempts = attempts
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (
            _rebuild_exhausted,
            (self.message, self.url, self.rank, self.hint, self.attempts),
        )


def _rebuild_exhausted(
    message: str, url: str | None, rank: int | None, hint: str | None, attempts: int
) -> RetriesExhaustedError:
    return RetriesExhaustedError(message, attempts=attempts, url=url, rank=rank, hint=hint)


class PermissionDeniedError(StorageError, PermissionError):
    """Credentials are missing, wrong, or lack permission (401/403). Never retried."""


class BadRequestError(StorageError):
    """The store rejected the request as malformed (400, EntityTooSmall, ...). Never retried."""


class NotFoundError(StorageError, FileNotFoundError):
    """An object or prefix does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket named in the URL does not exist."""


class PreconditionFailedError(StorageError):
    """A conditional request failed: the object exists already or changed (412/409)."""


class ObjectChangedError(PreconditionFailedError):
    """An object was overwritten while it was being read; nothing mixed was returned."""


class CommitConflictError(PreconditionFailedError):
    """A committed checkpoint already exists at this path and overwrite was not asked for."""


# --- checkpoint errors --------------------------------------------------------------------


class CheckpointError(CloudCkptError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the target."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (no manifest) at this path."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match what the manifest promises (size, checksum, format)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A tensor's or record's bytes do not match the checksum recorded at save time."""


class ManifestError(CorruptCheckpointError):
    """The manifest is unreadable, of an unknown version, or inconsistent."""


class StateDictMismatchError(CheckpointError, RuntimeError):
    """The target state dict does not fit the checkpoint (missing keys, shape or dtype)."""


class SaveFailedError(CheckpointError):
    """A save did not commit: this rank or another one failed."""
