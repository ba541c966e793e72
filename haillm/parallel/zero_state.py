"""ZeRO-1 optimizer state in checkpoint form: each rank's flat shard of a bucket, seen as pieces of every
parameter's state in the parameter's own shape, so torch.distributed.checkpoint saves global tensors that
any data-parallel layout can load back (each rank then fills only its own slice, in place).

A parameter that is itself one block of a larger tensor (tensor parallelism: ``Block``) is presented in the
whole tensor's shape, its pieces offset by the block's place, so the checkpoint holds the same tensors whatever
split wrote it, and any split (none included) reads them back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties


def _flat_range_boxes(lo: int, hi: int, shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split elements [lo, hi) of a row-major tensor into memory-ordered boxes (offsets, sizes),
    each contiguous in memory: a flat shard expressed in the parameter's real shape."""
    if lo >= hi:
        return []
    if len(shape) == 1:
        return [([lo], [hi - lo])]
    inner = math.prod(shape[1:])
    first, last = lo // inner, (hi - 1) // inner

    def row(r: int, a: int, b: int) -> list[tuple[list[int], list[int]]]:
        return [([r, *o], [1, *s]) for o, s in _flat_range_boxes(a, b, shape[1:])]

    if first == last:
        return row(first, lo - first * inner, hi - first * inner)
    boxes = row(first, lo % inner, inner) if lo % inner else []
    full_lo, full_hi = -(-lo // inner), hi // inner
    if full_hi > full_lo:
        boxes.append(([full_lo] + [0] * (len(shape) - 1), [full_hi - full_lo, *shape[1:]]))
    if hi % inner:
        boxes += row(last, 0, hi % inner)
    return boxes


@dataclass(frozen=True)
class Block:
    """A tensor that is block ``index`` of ``len(peers)`` equal blocks of a whole tensor along ``dim``, block t
    held by global rank ``peers[t]`` (``peers[index]`` is this rank). The peers lay out their state alike: the
    peer-t counterpart of a rank g of this rank's groups is ``g + peers[t] - peers[index]`` (a regular mesh)."""

    dim: int
    index: int
    peers: tuple[int, ...]

    def whole_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(n * len(self.peers) if d == self.dim else n for d, n in enumerate(shape))


def sharded_view(flat: Tensor, offset: int, shape: torch.Size, shard_size: int, rank: int, ranks: list[int],
                 group: dist.ProcessGroup | None, block: Block | None = None) -> Tensor:
    """Elements [offset, offset + numel(shape)) of a bucket whose flat storage is split into `len(ranks)`
    shards of `shard_size`, of which `flat` is this rank's (`rank`): a plain view when unsharded, else a
    ShardedTensor whose local shards are views of `flat`. With `block`, the ShardedTensor has the whole
    tensor's shape, and its metadata holds every peer's shards too (the same boxes, moved to its block)."""
    shape = tuple(shape) or (1,)
    numel, world = math.prod(shape), len(ranks)
    if world == 1 and block is None:
        return flat[offset : offset + numel].view(shape)
    peers = [(0, 0, True)] if block is None else [  # (offset along block.dim, rank shift, mine) of every block
        (t * shape[block.dim], peer - block.peers[block.index], t == block.index) for t, peer in enumerate(block.peers)]
    dim = 0 if block is None else block.dim
    shards_md, local = [], []
    for r in range(world):
        lo, hi = max(offset, r * shard_size) - offset, min(offset + numel, (r + 1) * shard_size) - offset
        pos = offset + lo - r * shard_size  # where element `lo` of the param sits in rank r's shard
        for offsets, sizes in _flat_range_boxes(lo, hi, shape):
            for along, shift, mine in peers:
                placed = [o + along if d == dim else o for d, o in enumerate(offsets)]
                md = ShardMetadata(placed, sizes, f"rank:{ranks[r] + shift}/{flat.device}")
                shards_md.append(md)
                if r == rank and mine:
                    local.append(Shard(flat[pos : pos + math.prod(sizes)].view(sizes), md))
            pos += math.prod(sizes)
    props = TensorProperties(dtype=flat.dtype, requires_grad=False)
    meta = ShardedTensorMetadata(shards_md, torch.Size(shape if block is None else block.whole_shape(shape)), props)
    # a block's peers lie outside `group`: the default group holds every placement
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, meta, process_group=group if block is None else None)


def whole_view(t: Tensor, block: Block) -> Tensor:
    """`t` (block `block.index` of a whole tensor) as a ShardedTensor of the whole shape whose local shard is a
    view of `t`: what a checkpoint saves, and loads into in place."""
    return sharded_view(t.view(-1), 0, t.shape, t.numel(), 0, [block.peers[block.index]], None, block)


def in_blocks(state: Mapping[str, Tensor], blocks: Mapping[str, Block]) -> dict[str, Tensor]:
    """`state` with the entries named in `blocks` as whole-shape views (`whole_view`), the others as they are."""
    return {key: whole_view(t, blocks[key]) if key in blocks else t for key, t in state.items()}


def _pieces(t: Tensor) -> dict[tuple[int, ...], Tensor]:
    """This rank's pieces of a (sharded or plain) tensor, keyed by their offsets in the full tensor."""
    if isinstance(t, ShardedTensor):
        return {tuple(s.metadata.shard_offsets): s.tensor for s in t.local_shards()}
    return {(0,) * t.ndim: t}


def copy_pieces(dst: Tensor, src: Tensor, name: str) -> None:
    """Copy `src` (sharded or plain, e.g. as DCP loaded it) into this rank's pieces of `dst`."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"state for {name} has shape {tuple(src.shape)}, model has {tuple(dst.shape)}")
    src_pieces = _pieces(src)
    for offsets, piece in _pieces(dst).items():
        if isinstance(src, ShardedTensor):
            value = src_pieces[offsets]
        else:
            value = src[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape, strict=True))]
        if value.data_ptr() != piece.data_ptr():
            piece.copy_(value)
