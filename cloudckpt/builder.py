"""Factories with upstream's signatures that build checkpointers on cloud storage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._upstream import BarrierConfig, CheckpointStager, RankInfo, WriterHook
from .barriers import (
    StoreAddress,
    agree_run_id,
    check_writer_barrier_config,
    default_rank_info,
    make_barrier,
)
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import CheckpointerConfig, CheckpointWriterConfig, StorageConfig
from .process import CheckpointProcess
from .reader import CheckpointReader
from .staging import CloudStager
from .writer import CheckpointWriter


def _resolve_rank_info(rank_info: RankInfo | None) -> tuple[RankInfo, RankInfo | None]:
    """The rank info to build with, and the same again when it was derived from the process
    group (the checkpointer re-checks that one at each save and load), else None."""
    if rank_info is not None:
        return rank_info, None
    derived = default_rank_info()
    return derived, derived


def default_subprocess_init_fn(*_: Any) -> None:
    """No-op subprocess initializer (upstream's default)."""


def default_writer_init_fn(
    rank_info: RankInfo,
    config: CheckpointWriterConfig | None = None,
    storage_config: StorageConfig | None = None,
    barrier_config: BarrierConfig | None = None,
    commit_hook: WriterHook | None = None,
    run_id: str | None = None,
    store_address: StoreAddress | None = None,
) -> CheckpointWriter:
    """Builds the writer inside the async subprocess: its own storage clients and barrier,
    nothing inherited from the parent (no event loops, no sockets). ``store_address``: the
    parent's default TCPStore, where a ``dist_barrier`` meets (this process has no group)."""
    config = config or CheckpointWriterConfig()
    barrier = make_barrier(
        barrier_config or BarrierConfig(),
        rank_info,
        config.write_barrier_timeout_secs,
        store_address=store_address,
    )
    return CheckpointWriter(
        config=config,
        rank_info=rank_info,
        barrier=barrier,
        commit_hook=commit_hook,
        storage_config=storage_config,
        run_id=run_id,
    )


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """A checkpointer that saves in the calling thread.

    Examples::

        ckpt = make_sync_checkpointer(CheckpointerConfig(storage_options={"endpoint_url": url}))
        ckpt.save("s3://bucket/run/step-100", model.state_dict())
        state = ckpt.load("s3://bucket/run/step-100")
    """
    config = config or CheckpointerConfig()
    rank_info, derived_rank_info = _resolve_rank_info(rank_info)
    storage_config = config.storage_config()
    writer = CheckpointWriter(
        config=config.writer_config,
        rank_info=rank_info,
        barrier=make_barrier(
            config.barrier_config, rank_info, config.writer_config.write_barrier_timeout_secs
        ),
        commit_hook=commit_hook,
        storage_config=storage_config,
    )
    reader = CheckpointReader(rank_info, config.reader_config, storage_config=storage_config)
    return SyncCheckpointer(writer=writer, reader=reader, derived_rank_info=derived_rank_info)


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
    commit_hook: WriterHook | None = None,
) -> AsyncCheckpointer:
    """A checkpointer that stages tensors to CPU and uploads from a spawned subprocess.

    Examples::

        ckpt = make_async_checkpointer(CheckpointerConfig(storage_options=opts))
        stage_future, write_future = ckpt.save("s3://bucket/run/step-100", state_dict)
        stage_future.result()   # tensors may be mutated again from here on
        write_future.result()   # committed
    """
    config = config or CheckpointerConfig()
    rank_info, derived_rank_info = _resolve_rank_info(rank_info)
    storage_config = config.storage_config()
    store_address = check_writer_barrier_config(
        config.barrier_config,
        rank_info,
        config.writer_config.write_barrier_timeout_secs,
    )
    run_id = agree_run_id(rank_info)
    init_args: dict[str, Any] = {
        "config": config.writer_config,
        "storage_config": storage_config,
        "barrier_config": config.barrier_config,
        "commit_hook": commit_hook,
        "run_id": run_id,
        "store_address": store_address,
    }
    if checkpoint_writer_init_fn is not default_writer_init_fn:
        init_args = {}
    init_args.update(checkpoint_writer_init_args or {})
    stager: CheckpointStager = CloudStager(config.staging_config)
    process = CheckpointProcess(
        rank_info=rank_info,
        config=config.process_config,
        subprocess_init_fn=subprocess_init_fn,
        subprocess_init_args=subprocess_init_args,
        checkpoint_writer_init_fn=checkpoint_writer_init_fn,
        checkpoint_writer_init_args=init_args,
    )
    reader = CheckpointReader(rank_info, config.reader_config, storage_config=storage_config)
    return AsyncCheckpointer(
        checkpoint_stager=stager,
        checkpoint_process=process,
        reader=reader,
        run_id=run_id,
        derived_rank_info=derived_rank_info,
    )
