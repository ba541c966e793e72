"""Context parallelism: one sequence split over the ``cp`` ranks, MLA's compressed latents exchanged.

**The split.** The sequence is cut into ``2 * cp`` equal chunks and rank r holds chunks r and
``2cp - 1 - r`` (``local``): under the causal mask the early chunk sees few keys and the late one many, so
every rank does the same attention work. Positions (RoPE, YaRN) are the global ones (``positions``).
Everything but attention works on the local tokens as it would on any tokens.

**Attention.** Every head's key and value are up-projections of one latent per token: ``kv_lora_rank +
qk_rope_head_dim`` numbers (576 at DeepSeek-V3's dimensions), against ``n_heads * (qk_head_dim + v_head_dim)``
= 40,960 for the per-head keys and values that ring attention passes around. So the ranks all-gather the
normalised latent and the rotated shared key (``start_gather``, in flight while the queries are computed, then
``finish_gather``; backward: the latents' gradients reduce-scattered back to their owners), and each rank
up-projects them itself, one key chunk at a time (``attention``): a chunk's per-head keys and values live while
its block of attention runs and are recomputed from the latents in backward, so nothing per head is kept for
the whole sequence. Each block of attention is the fused kernel with its log-sum-exp; the blocks merge exactly
(``haillm.ops.block_attention``). Under recompute the gathered latents are not kept either: backward gathers
them again (``regather``).

``cp`` ranks hold the same parameters and different tokens: their gradients are averaged as data parallelism
averages them (``haillm.parallel.mesh``). Every collective's output is read only after its wait (NCCL's rules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from haillm.ops.block_attention import block_backward, block_forward, merge_
from haillm.ops.graph_breaks import eager_in_compiled_regions
from haillm.ops.precision import widens
from haillm.parallel.collectives import all_gather_single, reduce_scatter_single

KeyValues = Callable[..., tuple[Tensor, Tensor]]  # a key chunk's saved inputs -> its per-head (k, v)


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """One context-parallel group. ``group=None`` (``NO_CP``) is cp=1: the sequence is whole."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def chunks(self) -> tuple[int, int]:
        """The global indices of this rank's two chunks, in local order."""
        return self.rank, 2 * self.size - 1 - self.rank

    def local(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's chunks of a whole-sequence tensor, concatenated along ``dim``."""
        if not self.enabled:
            return x
        pieces = x.chunk(2 * self.size, dim)
        return torch.cat([pieces[c] for c in self.chunks], dim)

    @property
    def holds_end(self) -> bool:
        """Whether this rank holds the sequence's last chunk (``2cp - 1``, the end of rank 0's local tokens)."""
        return self.rank == 0

    def positions(self, seq_len: int, device: torch.device | str | None = None) -> Tensor:
        """The global positions of this rank's tokens of a ``seq_len`` sequence."""
        return self.local(torch.arange(seq_len, device=device), 0)

    @eager_in_compiled_regions  # a compiled region breaks its graph here: the collective runs eagerly
    def start_gather(self, x: Tensor) -> PendingGather:
        """Start gathering the whole sequence from every rank's local ``x: [B, T / cp, ...]``; ``finish_gather``
        waits for it (the collective's output is read only after its wait, as NCCL requires)."""
        front = x.detach().contiguous()
        gathered = front.new_empty((self.size * front.shape[0], *front.shape[1:]))  # rank-major rows
        return PendingGather(x, gathered, all_gather_single(gathered, front, group=self.group, async_op=True))

    def finish_gather(self, pending: PendingGather, sizes: Sequence[int]) -> tuple[Tensor, ...]:
        """The whole sequence chunk by chunk: for each of ``sizes`` (a split of the last dim), a contiguous
        ``[2cp, B, T / (2cp), size]`` in global chunk order (a chunk, ``[j]``, is contiguous too: a linear reads
        it, and saves it, without a copy). Backward: the gradient summed over the ranks and each rank's chunks
        kept (a reduce-scatter)."""
        pending.work.wait()
        return _Gathered.apply(pending.x, pending.gathered, self, tuple(sizes))

    def regather(self, x: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
        """``finish_gather(start_gather(x), sizes)``'s values without autograd: the recipe that recomputes the
        gathered latents in backward instead of keeping them (``recompute``), as ring attention passes its
        keys and values around again in backward."""
        pending = self.start_gather(x)
        pending.work.wait()
        return _split_chunks(pending.gathered, self.size, sizes)

    def gather_sequence(self, x: Tensor) -> Tensor:
        """The whole sequence ``[B, T, ...]`` in global order from every rank's ``x: [B, T / cp, ...]`` (the
        identity at cp=1)."""
        if not self.enabled:
            return x
        (chunks,) = self.finish_gather(self.start_gather(x), (x.shape[-1],))
        return chunks.movedim(0, 1).flatten(1, 2)

    def sum_partials(self, x: Tensor) -> Tensor:
        """Sum over the group of a statistic each rank computed from its own tokens (the balance loss's). Its
        gradient is scaled by cp: a rank's loss is cp times its share of the whole (its losses are means over
        its own tokens), and the parameters' gradients are averaged over the cp ranks."""
        return _SumPartials.apply(x, self) if self.enabled else x

    def attention(self, q: Tensor, key_inputs: Sequence[tuple[Tensor, ...]], key_values: KeyValues,
                  scale: float) -> Tensor:
        """Causal attention of the local queries ``q: [B, H, T / cp, d]`` (this rank's two chunks) to the whole
        sequence's keys: ``key_values(*key_inputs[j])`` makes key chunk j's per-head ``(k, v)``, in forward
        with autograd (its gradient flows back through it) and again in backward without (the chunk's keys and
        values are never kept). Returns ``[B, H, T / cp, dv]`` in ``q``'s dtype."""
        if len(key_inputs) != 2 * self.size:
            raise ValueError(f"context attention needs {2 * self.size} key chunks, got {len(key_inputs)}")
        state = _Attention(self.chunks, scale)
        halves = q.split(q.shape[2] // 2, dim=2)
        tokens = []
        for j, inputs in enumerate(key_inputs):
            if j > max(self.chunks):
                continue  # no local query sees it
            k, v = key_values(*inputs)
            tokens.append(_KeyChunk.apply(state, j, key_values, *halves, k, v, *inputs))
        return _Merged.apply(state, *tokens)


NO_CP = ContextParallel()


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Give ``model`` (a ``DeepSeekV3`` or a pipeline stage) and its attention and MoE layers the group (their
    ``cp`` attribute); the MoE layers of the MTP block at depth k learn that the last k positions of their
    sequences have no target (``MoE.tail``). A no-op at cp=1."""
    if not cp.enabled:
        return
    for module in model.modules():
        if hasattr(module, "cp"):
            module.cp = cp
    for depth, mtp in enumerate(getattr(model, "mtp", {}).values(), start=1):
        for module in mtp.modules():
            if hasattr(module, "tail"):
                module.tail = depth


def _chunk_major(gathered: Tensor) -> Tensor:
    """``[cp, B, 2c, ...]`` (each rank's two chunks) -> ``[2cp, B, c, ...]`` in global chunk order."""
    early, late = gathered.unflatten(2, (2, -1)).unbind(2)  # rank r's chunk r and chunk 2cp-1-r
    return torch.cat([early, late.flip(0)], dim=0)


def _rank_major(chunks: Tensor, size: int) -> Tensor:
    """The inverse of ``_chunk_major``, contiguous."""
    early, late = chunks[:size], chunks[size:].flip(0)
    return torch.stack([early, late], dim=2).flatten(2, 3).contiguous()


def _split_chunks(gathered: Tensor, size: int, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """The rank-major rows of an all-gather as contiguous chunk-major parts of the features."""
    chunks = _chunk_major(gathered.unflatten(0, (size, -1)))
    return tuple(part.contiguous() for part in chunks.split(list(sizes), dim=-1))


@dataclass(frozen=True)
class PendingGather:
    """An all-gather of the local ``x`` in flight into ``gathered``."""

    x: Tensor
    gathered: Tensor
    work: dist.Work


class _Gathered(torch.autograd.Function):
    """``x``'s whole sequence, chunk-major and split along the features, from the finished all-gather
    ``gathered``; backward: reduce-scatter to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, gathered: Tensor, cp: ContextParallel, sizes: tuple[int, ...]
                ) -> tuple[Tensor, ...]:
        ctx.cp = cp
        return _split_chunks(gathered, cp.size, sizes)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        cp = ctx.cp
        per_rank = _rank_major(torch.cat(grads, dim=-1), cp.size)
        out = per_rank.new_empty(per_rank.shape[1:])
        reduce_scatter_single(out, per_rank.flatten(0, 1), op=dist.ReduceOp.SUM, group=cp.group)
        return out, None, None, None


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        ctx.size = cp.size
        out = x.contiguous().clone()
        dist.all_reduce(out, group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.size, None


@dataclass(eq=False)
class _Attention:
    """What the nodes of one ``ContextParallel.attention`` call share: per local query chunk, the output and
    log-sum-exp merged so far (in forward), and in backward the merged ones with the output's gradient."""

    query_chunks: tuple[int, int]
    scale: float
    out: list[Tensor | None] = field(default_factory=lambda: [None, None])
    lse: list[Tensor | None] = field(default_factory=lambda: [None, None])
    grad: list[Tensor | None] = field(default_factory=lambda: [None, None])

    def seen_by(self, key_chunk: int) -> list[int]:
        """The local query chunks (0, 1) that see key chunk ``key_chunk``."""
        return [i for i, c in enumerate(self.query_chunks) if key_chunk <= c]


class _KeyChunk(torch.autograd.Function):
    """Attention of the local queries to one key chunk, merged into the shared state; output: an empty tensor
    that ties the node into the graph (``_Merged`` gives it an empty gradient, and the chunk's gradients come
    from the state). Saves the chunk's inputs, not its keys and values."""

    @staticmethod
    def forward(ctx, state: _Attention, j: int, key_values: KeyValues, q0: Tensor, q1: Tensor, k: Tensor, v: Tensor,
                *inputs: Tensor) -> Tensor:
        queries = (q0, q1)
        for i in state.seen_by(j):
            block = block_forward(queries[i], k, v, j == state.query_chunks[i], state.scale)
            state.out[i], state.lse[i] = merge_(state.out[i], state.lse[i], *block)
        ctx.state, ctx.j, ctx.key_values = state, j, key_values
        ctx.save_for_backward(q0, q1, *inputs)
        return q0.new_empty(0)

    @staticmethod
    def backward(ctx, _: Tensor):
        state, j = ctx.state, ctx.j
        q0, q1, *inputs = ctx.saved_tensors
        with torch.no_grad():
            k, v = ctx.key_values(*inputs)
        queries, dq = (q0, q1), [None, None]
        dk = dv = None
        for i in state.seen_by(j):
            gq, gk, gv = block_backward(state.grad[i], queries[i], k, v, state.out[i], state.lse[i],
                                        j == state.query_chunks[i], state.scale)
            dq[i] = gq
            dk, dv = (gk, gv) if dk is None else (dk + gk, dv + gv)
        return None, None, None, *dq, dk, dv, *(None for _ in inputs)


class _Merged(torch.autograd.Function):
    """The merged output of every ``_KeyChunk`` of a call, in the queries' dtype. It keeps the output (as the
    fused kernel does: in the kernel's dtype, fp32 when emulated) and the log-sum-exp as its saved tensors, and
    backward hands them to the state with the output's gradient, for the key-chunk nodes, which run after it."""

    @staticmethod
    def forward(ctx, state: _Attention, *tokens: Tensor) -> Tensor:
        merged, lse = torch.cat(state.out, dim=2), torch.cat(state.lse, dim=2)
        out = merged.to(tokens[0].dtype)
        state.out, state.lse = [None, None], [None, None]  # held by this node from here
        ctx.state, ctx.n_tokens = state, len(tokens)
        ctx.save_for_backward(merged if widens(out) else out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        state = ctx.state
        out, lse = ctx.saved_tensors
        half = grad.shape[2] // 2
        # detached: the saved output unpacks with this node as its grad_fn, and the state, which the node's ctx
        # holds, would close a cycle through the autograd graph that no garbage collection frees
        state.out, state.lse, state.grad = (list(t.detach().split(half, dim=2)) for t in (out, lse, grad))
        return None, *(grad.new_empty(0) for _ in range(ctx.n_tokens))
