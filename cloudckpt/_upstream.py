"""The one module that imports torch's experimental checkpointer: everything shared with it.

cloudckpt keeps upstream's interface, so its value types (RankInfo, BarrierConfig, WriterHook,
the staging and process configs) and its barriers are upstream's own objects: a cloudckpt
writer can be handed to an upstream ``SyncCheckpointer`` and vice versa.
"""

from torch.distributed.checkpoint._experimental import (
    AsyncCheckpointer as UpstreamAsyncCheckpointer,
)
from torch.distributed.checkpoint._experimental import (
    Barrier,
    BarrierConfig,
    CheckpointStager,
    CheckpointStagerConfig,
    RankInfo,
    WriterHook,
    create_barrier_from_config,
    wrap_future,
)
from torch.distributed.checkpoint._experimental import (
    Checkpointer as UpstreamCheckpointer,
)
from torch.distributed.checkpoint._experimental import (
    CheckpointReader as UpstreamCheckpointReader,
)
from torch.distributed.checkpoint._experimental import (
    CheckpointWriter as UpstreamCheckpointWriter,
)
from torch.distributed.checkpoint._experimental import (
    SyncCheckpointer as UpstreamSyncCheckpointer,
)
from torch.distributed.checkpoint._experimental.barriers import BARRIER_REGISTRY, register_barrier
from torch.distributed.checkpoint._experimental.checkpoint_process import (
    CheckpointProcess as UpstreamCheckpointProcess,
)
from torch.distributed.checkpoint._experimental.checkpoint_process import (
    CheckpointProcessConfig,
)
from torch.distributed.checkpoint._experimental.staging import DefaultStager
from torch.distributed.checkpoint._experimental.types import STATE_DICT

__all__ = [
    "BARRIER_REGISTRY",
    "STATE_DICT",
    "Barrier",
    "BarrierConfig",
    "CheckpointProcessConfig",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "DefaultStager",
    "RankInfo",
    "UpstreamAsyncCheckpointer",
    "UpstreamCheckpointProcess",
    "UpstreamCheckpointReader",
    "UpstreamCheckpointWriter",
    "UpstreamCheckpointer",
    "UpstreamSyncCheckpointer",
    "WriterHook",
    "create_barrier_from_config",
    "register_barrier",
    "wrap_future",
]
