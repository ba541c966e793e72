"""Parallelism: ParallelDims (mesh.py) owns ranks and groups; ZeroAdamW (zero.py) shards optimizer state."""

from haillm.parallel.mesh import ParallelConfigError, ParallelDims
from haillm.parallel.zero import ZeroAdamW

__all__ = ["ParallelConfigError", "ParallelDims", "ZeroAdamW"]
