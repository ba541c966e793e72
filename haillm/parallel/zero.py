"""ZeRO-1 AdamW: optimizer state sharded over the data-parallel group.

Each param group's parameters are packed, in reverse registration order (about the order backward
produces their gradients), into flat buckets of roughly `bucket_mb`, padded to a multiple of the group
size. Model parameters become views into their bucket's flat storage, and fp32 parameters' `.grad`
views into the bucket's fp32 gradient buffer, so neither reduction nor gather copies per parameter.
Each rank owns one contiguous 1/dp shard of every bucket: both Adam moments and the fp32 master
weights for that shard only (for fp32 params the master shard is the rank's slice of the parameter
storage itself). Reduce-scatter and all-gather both run in place in the bucket buffers.

Mixed precision (DeepSeek-V3, Megatron's distributed optimizer): parameters may be bf16, the compute
copy; their fp32 masters then exist only as this rank's shards. Gradients always accumulate in fp32:
every parameter gets ``main_grad``, its fp32 view into the bucket's gradient buffer. A bf16 ``.grad``
that autograd produces is added into it (and dropped) as soon as it is accumulated, micro-batch by
micro-batch; code that produces weight gradients outside autograd (deferred W) adds to ``main_grad``.
The reduction runs in fp32 (``reduce_dtype=bfloat16`` halves its bytes).

One step:
  1. Backward of non-final micro-batches runs under `no_sync()`: gradients accumulate locally.
  2. On the final micro-batch, post-accumulate-grad hooks count ready parameters; a complete bucket is
     reduce-scattered asynchronously (sum, then / dp) while backward goes on. Buckets are launched in
     the same order on every rank (a ready bucket waits for earlier ones) so collectives always match.
  3. `clip_grad_norm_` sums squared shard norms over each param group's reduction group, then over
     that group's own `norm_groups` (groups whose ranks hold *different* params of it: ep for experts,
     tp for tp-sharded weights), adds the groups, sums the total over the optimizer's `norm_groups`
     (pp: every stage holds different params) and scales the shards.
  4. `step` runs AdamW on the shards (same arithmetic as torch.optim.AdamW's single-tensor path), then
     all-gathers each bucket in place into the parameters, first layers first; the gathers are waited
     at the end of `step` unless `register_forward_wait(model)` moved the wait to each module's forward
     (`zero_forward_wait.py`).

Param groups: dicts like torch's, `{"params": [(name, param), ...], "process_group": pg, "norm_groups":
(pg, ...), "lr": ..., "weight_decay": ...}`; keys left out take the constructor's values.
`process_group` is the group the params are replicated over (dp for dense weights, edp for experts;
None: not replicated, nothing reduced); the reduced sum is divided by `grad_divisor` (default: that
group's size; experts use dp because each expert's gradient already holds every EP rank's tokens).
A group with `"in_norm": False` is left out of the gradient norm (it is still clipped): for copies of
parameters that another rank of `norm_groups` holds too (DualPipe's mirror stages).
`weight_decay` applies to params for which
`no_decay(name, param)` is False (default: every 1-D param: norms, biases). `state_pieces(name, param)`
may checkpoint one parameter's state as several named pieces (stacked experts under per-expert names, so
that the state reshards across expert layouts); by default each parameter is one piece. Params without a gradient
in a step count as zero-gradient (Adam still decays their moments).
A piece named in `state_dict(blocks)` is one block of a larger tensor (tensor parallelism): saved in the whole's shape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from haillm.parallel.collectives import all_gather_single, reduce_scatter_single
from haillm.parallel.zero_buckets import Bucket, BucketPlan, ParamSpec, plan_buckets
from haillm.parallel.zero_forward_wait import ForwardWait
from haillm.parallel.zero_state import Block, copy_pieces, sharded_view

STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")
DEFAULT_BUCKET_MB = 32.0  # gradient bucket size (counted in fp32 elements)
# (name, param) -> the pieces its state is checkpointed as: (name, element offset in the param, shape).
StatePieces = Callable[[str, Tensor], list[tuple[str, int, torch.Size]]]


def whole_param(name: str, param: Tensor) -> list[tuple[str, int, torch.Size]]:
    """The default `state_pieces`: each parameter's state under its own name and shape."""
    return [(name, 0, param.shape)]


def default_no_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases and every other 1-D parameter are not weight-decayed."""
    return param.ndim < 2 or name.endswith(".bias")


def _group_size(pg: dist.ProcessGroup | None) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


class ZeroAdamW:
    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        process_group: dist.ProcessGroup | None = None,
        norm_groups: Iterable[dist.ProcessGroup] = (),
        bucket_mb: float = DEFAULT_BUCKET_MB,
        moment_dtype: torch.dtype = torch.float32,
        reduce_dtype: torch.dtype = torch.float32,
        no_decay: Callable[[str, Tensor], bool] = default_no_decay,
        state_pieces: StatePieces | None = None,
    ) -> None:
        params = list(params)
        user_groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, norm_groups=())
        self.param_groups: list[dict[str, Any]] = []
        for g in user_groups:
            group = {**defaults, "process_group": process_group, **g}
            group["params"] = list(group["params"])
            if any(isinstance(item, Tensor) for item in group["params"]):
                raise TypeError("ZeroAdamW needs (name, param) pairs: pass model.named_parameters()")
            group["params"] = [(n, p) for n, p in group["params"] if p.requires_grad and p.numel()]
            self.param_groups.append(group)
        self.norm_groups = tuple(norm_groups)
        self.moment_dtype, self.reduce_dtype = moment_dtype, reduce_dtype
        self.no_decay = no_decay
        self.state_pieces = state_pieces or whole_param
        self.step_count = 0
        self._sync = True
        self._overlap_gather = False
        self._buckets = self._build_buckets(int(bucket_mb * 2**20))
        self._bucket_of: dict[int, tuple[Bucket, int]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_wait = ForwardWait(self._buckets, self.wait_params)
        for b in self._buckets:
            for i, p in enumerate(b.params):
                self._bucket_of[id(p)] = (b, i)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        self._device = self._buckets[0].grad_buf.device if self._buckets else torch.device("cpu")
        self._queues: dict[int, list[Bucket]] = {}  # per reduction group, in launch order
        for b in self._buckets:
            self._queues.setdefault(id(b.group["process_group"]), []).append(b)
        self._next_launch: dict[int, int] = {}  # per reduction group: index of the next bucket to launch

    # ---- construction ----
    def _build_buckets(self, bucket_bytes: int) -> list[Bucket]:
        specs = [[ParamSpec(n, tuple(p.shape), p.dtype, str(p.device), id(p)) for n, p in g["params"]]
                 for g in self.param_groups]
        worlds = [_group_size(g["process_group"]) for g in self.param_groups]
        plans = plan_buckets(specs, worlds, bucket_bytes)  # the layout haillm.tools.plan predicts memory from
        return [self._make_bucket(self.param_groups[plan.group], plan) for plan in plans]

    def _make_bucket(self, group: dict[str, Any], plan: BucketPlan) -> Bucket:
        pg = group["process_group"]
        world, numel, offsets = plan.world, plan.numel, list(plan.offsets)
        rank = dist.get_rank(pg) if world > 1 else 0
        members = [group["params"][i] for i in plan.members]
        like = members[0][1]
        param_buf = torch.zeros(numel, dtype=like.dtype, device=like.device)
        grad_buf = torch.zeros(numel, dtype=torch.float32, device=like.device)
        for (_, p), off in zip(members, offsets, strict=True):
            view = param_buf[off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view  # the model now reads the bucket: gathers land in place
            p.main_grad = grad_buf[off : off + p.numel()].view_as(p)  # fp32 accumulator, as Megatron's
            if p.dtype == torch.float32:
                p.grad = p.main_grad
        size = numel // world
        lo, hi = rank * size, (rank + 1) * size
        # fp32 params: the master shard *is* the rank's slice of the parameters (gathered in place)
        master = param_buf[lo:hi] if like.dtype == torch.float32 else param_buf[lo:hi].float()
        decay_ranges: list[tuple[int, int]] = []
        for (name, p), off in zip(members, offsets, strict=True):
            a, b = max(off, lo) - lo, min(off + p.numel(), hi) - lo
            if a < b and not self.no_decay(name, p):
                if decay_ranges and decay_ranges[-1][1] == a:
                    a = decay_ranges.pop()[0]
                decay_ranges.append((a, b))
        return Bucket(
            group=group,
            names=[n for n, _ in members],
            params=[p for _, p in members],
            offsets=offsets,
            numel=numel,
            world=world,
            rank=rank,
            param_buf=param_buf,
            grad_buf=grad_buf,
            shard_grad=grad_buf[lo:hi],  # reduce-scattered in place
            state={
                "master": master,
                "exp_avg": torch.zeros(size, dtype=self.moment_dtype, device=like.device),
                "exp_avg_sq": torch.zeros(size, dtype=self.moment_dtype, device=like.device),
            },
            decay_ranges=decay_ranges,
        )

    # ---- gradients ----
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (non-final micro-batches): no communication."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _absorb_grad(self, b: Bucket, i: int) -> None:
        """Make sure param i's gradient lives in the bucket: fp32 `.grad` must be the buffer view (if code
        replaced it, the new tensor is the gradient); a bf16 `.grad` holds new contributions to add."""
        p, off = b.params[i], b.offsets[i]
        view = b.grad_buf[off : off + p.numel()].view_as(p)
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            if p.dtype == torch.float32:
                view.copy_(p.grad)
                p.grad = view
            else:
                view.add_(p.grad)
                p.grad = None

    def _on_grad_ready(self, p: Tensor) -> None:
        b, i = self._bucket_of[id(p)]
        self._absorb_grad(b, i)
        if not self._sync:
            return
        if b.launched:
            raise RuntimeError(
                f"gradient of {b.names[i]} arrived after its bucket was reduced: run every backward but "
                "the last of a step under no_sync(), and call zero_grad() after each step"
            )
        b.ready.add(i)
        if len(b.ready) == len(b.params):
            self._launch_ready(id(b.group["process_group"]), force=False)

    def _launch_ready(self, key: int, force: bool) -> None:
        """Launch a reduction group's buckets strictly in bucket order (identical on every rank)."""
        queue, i = self._queues[key], self._next_launch.get(key, 0)
        while i < len(queue) and (force or len(queue[i].ready) == len(queue[i].params)):
            self._launch_reduce(queue[i])
            i += 1
        self._next_launch[key] = i

    def _launch_reduce(self, b: Bucket) -> None:
        b.launched = True
        for i in range(len(b.params)):  # gradients written without autograd (no hook) count too
            self._absorb_grad(b, i)
        if b.world == 1:
            if b.divisor != 1:
                b.shard_grad.div_(b.divisor)
            return
        src = b.grad_buf if self.reduce_dtype == torch.float32 else b.grad_buf.to(self.reduce_dtype)
        lo, hi = b.shard
        b.reduce_out = src[lo:hi]  # in place: this rank's chunk of the input receives the sum
        b.reduce_work = reduce_scatter_single(
            b.reduce_out, src, op=dist.ReduceOp.SUM, group=b.group["process_group"], async_op=True
        )

    def finish_grad_sync(self) -> None:
        """Launch every bucket not launched yet (unused params, all micro-batches under no_sync) and
        wait for all reductions. Called by clip_grad_norm_ and step; idempotent within a step."""
        for key in self._queues:
            self._launch_ready(key, force=True)
        for b in self._buckets:
            if b.reduce_work is not None:
                b.reduce_work.wait()
                b.reduce_work = None
                if b.reduce_out.data_ptr() != b.shard_grad.data_ptr():
                    b.shard_grad.copy_(b.reduce_out)
                b.reduce_out = None
                b.shard_grad.div_(b.divisor)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the reduced gradient so its global L2 norm is at most `max_norm`; return the norm before
        clipping. A non-finite norm is returned untouched (and nothing is scaled) so the caller can skip."""
        self.finish_grad_sync()
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        for group in self.param_groups:
            if not group.get("in_norm", True):  # a second copy of parameters another rank counts already
                continue
            sq = torch.zeros((), dtype=torch.float64, device=self._device)
            for b in self._buckets:
                if b.group is group:
                    sq += torch.dot(b.shard_grad, b.shard_grad).double()
            for pg in (group["process_group"], *group["norm_groups"]):
                if _group_size(pg) > 1:
                    dist.all_reduce(sq, group=pg)
            total += sq
        for pg in self.norm_groups:
            if _group_size(pg) > 1:
                dist.all_reduce(total, group=pg)
        norm = total.sqrt().item()
        if math.isfinite(norm) and max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for b in self._buckets:
                b.shard_grad.mul_(coef)
        return norm

    # ---- update ----
    @torch.no_grad()
    def step(self) -> None:
        self.finish_grad_sync()
        self.wait_params()
        self.step_count += 1
        for b in reversed(self._buckets):  # first layers first: the next forward needs them first
            self._adamw(b)
            self._launch_gather(b)
        if not self._overlap_gather:
            self.wait_params()

    def _adamw(self, b: Bucket) -> None:
        g = b.group
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        master, grad = b.state["master"], b.shard_grad
        if wd != 0:
            for lo, hi in b.decay_ranges:
                master[lo:hi].mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = b.state["exp_avg"].float(), b.state["exp_avg_sq"].float()  # no copy if fp32
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if self.moment_dtype != torch.float32:
            b.state["exp_avg"].copy_(exp_avg)
            b.state["exp_avg_sq"].copy_(exp_avg_sq)

    def _launch_gather(self, b: Bucket) -> None:
        lo, hi = b.shard
        if b.state["master"].data_ptr() != b.param_buf[lo:hi].data_ptr():
            b.param_buf[lo:hi].copy_(b.state["master"])
        if b.world > 1:
            b.gather_work = all_gather_single(
                b.param_buf, b.param_buf[lo:hi], group=b.group["process_group"], async_op=True
            )

    def wait_params(self, buckets: Iterable[Bucket] | None = None) -> None:
        """Block until the updated parameters are gathered (all buckets, or the given ones)."""
        for b in self._buckets if buckets is None else buckets:
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def order_after_gathers(self) -> None:
        """Order the current stream after every parameter all-gather in flight (NCCL; gloo blocks the host)
        without taking them: the forward's per-module waits still come. For readers on a side stream."""
        for b in self._buckets:
            if b.gather_work is not None:
                b.gather_work.wait()

    def register_forward_wait(self, model: nn.Module, regions: Iterable[nn.Module] = ()) -> None:
        """Let `step` return before the parameter all-gathers finish: each module of `model` waits for the
        buckets of its own parameters before it reads them (`zero_forward_wait`; `regions` are torch.compile'd
        modules, each waiting for all its parameters at entry)."""
        self._forward_wait.register(model, regions)
        self._overlap_gather = True

    def close(self) -> None:
        """Remove this optimizer's hooks and method wrappers from the parameters and modules. The hooks reference
        the optimizer from tensors that the garbage collector does not traverse, so without this an optimizer
        and its buffers (fp32 masters, moments, gradient buckets) live as long as the model does."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._forward_wait.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers and start a new step. `set_to_none` is accepted for torch
        compatibility and ignored: fp32 parameters keep `.grad` as views of the buffer."""
        for b in self._buckets:  # never zero a buffer that a reduction still reads
            if b.reduce_work is not None:
                b.reduce_work.wait()
            b.reduce_work = b.reduce_out = None
            b.grad_buf.zero_()
            b.ready.clear()
            b.launched = False
            for p, off in zip(b.params, b.offsets, strict=True):
                p.grad = b.grad_buf[off : off + p.numel()].view_as(p) if p.dtype == torch.float32 else None
        self._next_launch.clear()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (master weights and both moments)."""
        return sum(t.numel() * t.element_size() for b in self._buckets for t in b.state.values())

    # ---- checkpoint (torch.distributed.checkpoint) ----
    def state_dict(self, blocks: Mapping[str, Block] | None = None) -> dict[str, Any]:
        """`{"step": tensor, "state": {fqn: {"master"|"exp_avg"|"exp_avg_sq": tensor}}}` in each
        parameter's own shape (a piece named in `blocks`: its whole tensor's). With a sharded group or a block
        each tensor is a ShardedTensor whose local shards are views of this rank's state, so DCP saves only
        those and, on load, fills them in place from whatever layout wrote the checkpoint. Pass the optimizer
        itself to dcp.save / dcp.load (with `blocks`: a Stateful passing them)."""
        return {"step": torch.tensor(self.step_count), "state": dict(self._views(blocks or {}))}

    def _pieces(self) -> Iterator[tuple[Bucket, int, str, int, torch.Size]]:
        """(bucket, param index, checkpoint name, element offset in the param, shape) of every piece of state."""
        for b in self._buckets:
            for i, (name, p) in enumerate(zip(b.names, b.params, strict=True)):
                for piece, offset, shape in self.state_pieces(name, p):
                    yield b, i, piece, offset, shape

    def _views(self, blocks: Mapping[str, Block]) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """Every piece's checkpoint name and its state by kind, in checkpoint form."""
        for b, i, name, offset, shape in self._pieces():
            yield name, {kind: self._state_view(b, i, kind, offset, shape, blocks.get(name)) for kind in STATE_KINDS}

    def _state_view(self, b: Bucket, i: int, kind: str, offset: int, shape: torch.Size,
                    block: Block | None = None) -> Tensor:
        """`shape` elements from `offset` of parameter i of bucket b's `kind` state (sharded over the group; with
        `block`, placed in its whole tensor)."""
        pg = b.group["process_group"]
        ranks = dist.get_process_group_ranks(pg) if b.world > 1 else [block.peers[block.index] if block else 0]
        return sharded_view(b.state[kind], b.offsets[i] + offset, shape, b.numel // b.world, b.rank, ranks, pg, block)

    def reset_moments(self) -> None:
        """Start Adam afresh from the current master weights: zero moments and step count (fine-tuning)."""
        for b in self._buckets:
            b.state["exp_avg"].zero_()
            b.state["exp_avg_sq"].zero_()
        self.step_count = 0

    def load_state_dict(self, state_dict: dict[str, Any], blocks: Mapping[str, Block] | None = None) -> None:
        """Adopt a state dict (loaded in place by DCP, or any full/sharded one with the same FQNs and
        shapes; the `blocks` of `state_dict`), then rebuild the parameters from the loaded master weights."""
        state = state_dict["state"]
        expected = {name for _, _, name, _, _ in self._pieces()}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"optimizer state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, views in self._views(blocks or {}):
            for kind, view in views.items():
                copy_pieces(view, state[name][kind], name)
        self.step_count = int(state_dict["step"])
        for b in reversed(self._buckets):
            self._launch_gather(b)
        self.wait_params()
