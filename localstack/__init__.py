"""Start and stop local S3 (moto, SeaweedFS) and GCS (fake-gcs-server) servers without Docker.

Used by cloudckpt's tests and examples, and by users: ``python -m localstack up`` runs them in
the background (see ``localstack/README.md``).
"""

from .servers import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_REGION,
    DEFAULT_SECRET_KEY,
    ExternalGCSServer,
    ExternalS3Server,
    FakeGCSServer,
    LocalServer,
    MotoServer,
    S3Server,
    SeaweedServer,
    ServerAlreadyRunningError,
    ServerError,
    ServerStartError,
    find_free_port,
    find_free_ports,
)

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_REGION",
    "DEFAULT_SECRET_KEY",
    "ExternalGCSServer",
    "ExternalS3Server",
    "FakeGCSServer",
    "LocalServer",
    "MotoServer",
    "S3Server",
    "SeaweedServer",
    "ServerAlreadyRunningError",
    "ServerError",
    "ServerStartError",
    "find_free_port",
    "find_free_ports",
]
