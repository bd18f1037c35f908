"""Self-hosted pools of GPUs reached over HTTP; ``PoolClient`` is shared with the cloud pool adapters."""

from providers.pools.client import PoolClient
from providers.pools.provider import PoolProvider

__all__ = ["PoolClient", "PoolProvider"]
