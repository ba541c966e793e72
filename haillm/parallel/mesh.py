"""ParallelDims: the one authority on rank arithmetic and process groups.

Layout. Global ranks are laid out on a 5-D mesh ``(pp, edp, ep, cp, tp)``, tp fastest:

    rank = (((pp_rank * edp + edp_rank) * ep + ep_rank) * cp + cp_rank) * tp + tp_rank,   edp = dp // ep

so tensor-parallel peers are adjacent ranks (same node), pipeline stages are the outermost blocks.
The data-parallel group is the flattened ``(edp, ep)`` pair with ``dp_rank = edp_rank * ep + ep_rank``.
Expert parallelism lives *inside* data parallelism (DeepSeek-style): an ep group is ``ep`` consecutive
dp ranks that split the routed experts between them, and the expert-data-parallel (edp) group joins the
ranks holding the same experts (stride ``ep`` in dp rank), over which expert gradients are reduced.
"Nodes" for node-limited routing are consecutive blocks of ``ranks_per_node`` global ranks.

Tensor parallelism (``tp``, innermost: its ranks share a node, ``ranks_per_node`` must be a multiple of it):
the tp ranks of one data-parallel rank see the same data.

Context parallelism (``cp``, between ep and tp): the cp ranks of one data-parallel rank see the same sequences,
each its own chunks of them (``haillm.parallel.context``). They hold the same parameters, whose gradients are
averaged over them as over dp: every parameter's gradient replicas are ``dp_cp`` (dense) or ``edp_cp`` (routed
experts). Two more groups join tp to those, for parameters replicated over tp whose gradients each tp rank
holds only a part of (``haillm.parallel.tensor_plan``): ``dp_cp_tp`` and ``edp_cp_tp`` (routed experts, which
every tp rank holds and feeds with its own rows).

With world size 1 and torch.distributed not initialised, no group is created: every group accessor
returns None and every rank is 0, so single-process code takes the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "edp", "ep", "cp", "tp")
FLAT_DIMS = {"dp": ("edp", "ep"), "dp_cp": ("edp", "ep", "cp"), "edp_cp": ("edp", "cp"),
             "dp_cp_tp": ("edp", "ep", "cp", "tp"), "edp_cp_tp": ("edp", "cp", "tp")}


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run; the message is one line naming the config keys."""


@dataclass
class ParallelDims:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    ep: int = 1
    world_size: int = 1
    ranks_per_node: int = 8
    rank: int | None = None  # this process's global rank; None: from torch.distributed (0 without it)
    cp: int = 1
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    flat: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)  # FLAT_DIMS' meshes

    def __post_init__(self) -> None:
        if self.rank is None:
            self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.validate()

    @classmethod
    def from_config(cls, parallel: Any, world_size: int | None = None) -> ParallelDims:
        """From `cfg.parallel` (dp, pp, tp, ep, cp, ranks_per_node); world size from torch.distributed (1 without)."""
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        keys = ("dp", "pp", "tp", "ep", "cp", "ranks_per_node")
        return cls(**{k: getattr(parallel, k) for k in keys}, world_size=world_size)

    def validate(self) -> None:
        for name in ("dp", "pp", "tp", "ep", "cp", "ranks_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"parallel.{name} must be an integer >= 1, got {value!r}")
        product = self.dp * self.pp * self.cp * self.tp
        if product != self.world_size:
            shown = f"dp={self.dp}, pp={self.pp}, cp={self.cp}, tp={self.tp}"
            raise ParallelConfigError(
                f"parallel.dp*pp*cp*tp = {product} ({shown}) but world size is {self.world_size} "
                "(torchrun --nproc_per_node)"
            )
        if self.tp > 1 and self.ranks_per_node % self.tp:
            raise ParallelConfigError(
                f"parallel.tp={self.tp} must divide parallel.ranks_per_node={self.ranks_per_node} "
                "(a tensor-parallel group stays on one node)"
            )
        if self.dp % self.ep:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp={self.dp} "
                "(experts are split over ep ranks inside the data-parallel group)"
            )
        if not 0 <= self.rank < self.world_size:
            raise ParallelConfigError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def edp_cp(self) -> int:
        return self.edp * self.cp

    @property
    def dp_cp_tp(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def edp_cp_tp(self) -> int:
        return self.edp * self.cp * self.tp

    # ---- rank arithmetic (valid before build()) ----
    def coords(self, rank: int | None = None) -> dict[str, int]:
        """Mesh coordinates of a global rank: pp, edp, ep, cp, tp and the derived dp."""
        rank = self.rank if rank is None else rank
        tp_rank, rest = rank % self.tp, rank // self.tp
        cp_rank, rest = rest % self.cp, rest // self.cp
        ep_rank, rest = rest % self.ep, rest // self.ep
        edp_rank, pp_rank = rest % self.edp, rest // self.edp
        return {
            "pp": pp_rank,
            "edp": edp_rank,
            "ep": ep_rank,
            "cp": cp_rank,
            "tp": tp_rank,
            "dp": edp_rank * self.ep + ep_rank,
        }

    def global_rank(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        """Global rank at pipeline stage `pp`, data-parallel rank `dp`, tensor-parallel rank `tp`, context-parallel
        rank `cp`."""
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    @property
    def pp_rank(self) -> int:
        return self.coords()["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords()["dp"]

    @property
    def tp_rank(self) -> int:
        return self.coords()["tp"]

    @property
    def cp_rank(self) -> int:
        return self.coords()["cp"]

    @property
    def ep_rank(self) -> int:
        return self.coords()["ep"]

    @property
    def edp_rank(self) -> int:
        return self.coords()["edp"]

    @property
    def is_rank0(self) -> bool:
        """Global rank 0: the one process that logs and writes run-level files."""
        return self.rank == 0

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def pp_stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` with this rank's dp, cp and tp coordinates (for send/recv)."""
        return self.global_rank(stage, self.dp_rank, self.tp_rank, self.cp_rank)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def ep_group_ranks(self) -> list[int]:
        """Global ranks of this rank's ep group, ordered by ep rank (expert shard index)."""
        c = self.coords()
        return [self.global_rank(c["pp"], c["edp"] * self.ep + e, c["tp"], c["cp"]) for e in range(self.ep)]

    # ---- process groups ----
    def build(self, device_type: str = "cpu", timeout: timedelta | None = None) -> ParallelDims:
        """Create every process group once (collective: all ranks must call it). No-op without dist.

        `timeout` bounds each collective of every group (`train.collective_timeout_s`): DeviceMesh creates
        its groups with the backend's default (30 min on gloo, 10 on NCCL), not the default group's."""
        if not dist.is_initialized():
            if self.world_size != 1:
                raise ParallelConfigError(
                    f"world size {self.world_size} needs torch.distributed initialised (launch with torchrun)"
                )
            return self
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ParallelConfigError(
                f"ParallelDims(world_size={self.world_size}, rank={self.rank}) does not match the process "
                f"group (world size {dist.get_world_size()}, rank {dist.get_rank()})"
            )
        shape = (self.pp, self.edp, self.ep, self.cp, self.tp)
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        for name, dims in FLAT_DIMS.items():
            self.flat[name] = self.mesh[dims]._flatten(name)  # kept: slicing it from the root is deprecated
        if timeout is not None:
            for name in (*MESH_DIMS, *FLAT_DIMS):
                dist.distributed_c10d._set_pg_timeout(timeout, self.group(name))
        return self

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of a mesh dimension or of a flattened one (``FLAT_DIMS``), by name."""
        if self.mesh is None:
            if self.world_size != 1:
                raise RuntimeError("ParallelDims.build() must be called before asking for process groups")
            return None
        return (self.flat[name] if name in self.flat else self.mesh[name]).get_group()

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.group("pp")

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.group("tp")

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup | None:
        return self.group("edp")

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.group("cp")

