"""Checkpointer saves through an unreliable network (fault proxy in front of moto)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import torch
from backends import Backend
from cases import assert_bitwise_equal
from faultproxy import FaultProxy

import cloudckpt
from cloudckpt import CheckpointerConfig, RetryConfig, UploadConfig

MiB = 1 << 20


@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_ten_64mib_saves_through_throttling_and_resets(backend: Backend) -> None:
    endpoint = urlsplit(backend.storage_options["endpoint_url"])
    g = torch.Generator().manual_seed(11)
    direct = cloudckpt.make_sync_checkpointer(
        CheckpointerConfig(storage_options=backend.storage_options)
    )
    with FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80, seed=21) as proxy:
        flaky = cloudckpt.make_sync_checkpointer(
            CheckpointerConfig(
                storage_options={**backend.storage_options, "endpoint_url": proxy.endpoint_url},
                upload_config=UploadConfig(part_size_bytes=8 * MiB, max_concurrency=4),
                retry_config=RetryConfig(
                    max_attempts=12, initial_backoff_secs=0.01, max_backoff_secs=0.2
                ),
            )
        )
        proxy.configure(throttle_fraction=0.10, reset_fraction=0.02)
        retries = 0
        for i in range(10):
            sd = {f"w{j}": torch.randn(2 * MiB, generator=g) for j in range(8)}  # 64 MiB
            path = backend.url(f"step-{i}")
            flaky.save(path, sd)
            retries += flaky.last_metrics.retries
            assert_bitwise_equal(direct.load(path), sd)
        faults = proxy.count(outcome="error 503") + proxy.count(outcome="reset")
    assert faults > 0 and retries > 0
    storage = direct._writer.storage(backend.base_url)
    assert storage.list_pending_uploads(backend.base_url) == []
