"""Staging: copy the state dict's tensors off the accelerator into CPU (shared) memory."""

from __future__ import annotations

from ._upstream import CheckpointStager, CheckpointStagerConfig, DefaultStager


class CloudStager(DefaultStager):
    """Upstream's DefaultStager (reusable CPU buffers, shared memory, non-blocking copies)."""

    def __init__(self, config: CheckpointStagerConfig) -> None:
        super().__init__(config)


__all__ = ["CheckpointStager", "CloudStager"]
