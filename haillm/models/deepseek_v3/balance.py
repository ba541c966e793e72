"""Expert-load bookkeeping and the complementary sequence-wise balance loss (report eqs. 17-20) of the MoE
layers: per-expert counts that never wait for the device, the loss from some of a sequence's rows (tensor- and
context-parallel ranks each hold some), and the max-violation figure the trainer logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from haillm.parallel.context import ContextParallel
from haillm.parallel.tensor import TensorParallel

if TYPE_CHECKING:
    from haillm.models.deepseek_v3.moe import MoE


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token copies per expert, ``[n_experts]`` int64: a fixed-size scatter (``bincount`` sizes its output
    from the data and so waits for the device)."""
    flat = indices.flatten()
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def valid_counts(indices: torch.Tensor, n_experts: int, valid: torch.Tensor) -> torch.Tensor:
    """``expert_counts`` of the rows where ``valid: [n]`` is 1 (``[n_experts]`` in ``valid``'s dtype)."""
    return valid.new_zeros(n_experts).scatter_add_(0, indices.flatten(), valid[:, None].expand_as(indices).flatten())


class SumRows(torch.autograd.Function):
    """``rows`` summed into ``n`` rows by ``token_ids`` (``index_add``), keeping only ``token_ids``: autograd's
    ``index_add`` would keep ``rows`` too. Backward is ``index_add``'s, a gather."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, token_ids: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(token_ids)
        return rows.new_zeros(n, rows.shape[-1]).index_add(0, token_ids, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token_ids,) = ctx.saved_tensors
        return grad.index_select(0, token_ids), None, None


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (report eqs. 17-20), averaged over sequences.

    ``scores: [B, T, N_r]`` unbiased affinities, ``indices: [B, T, K_r]`` the experts each token was actually
    routed to (chosen with the bias and the group limit). We use the actually selected set rather than the
    unbiased top-K of eq. 18 because the loss exists to counter imbalance in the load experts really receive
    inside a sequence; the bias already moved tokens and penalising a routing that did not happen would
    fight the bias. Gradient flows through ``P_i`` only. With perfect balance the value is exactly ``alpha``.
    """
    bsz, seq_len, _ = scores.shape
    return rows_balance_loss(scores.flatten(0, 1), indices.flatten(0, 1), None, bsz, seq_len, alpha)


def rows_balance_loss(scores: torch.Tensor, indices: torch.Tensor, seq_ids: torch.Tensor | None, n_seqs: int,
                      seq_len: int, alpha: float, ranks: Sequence[TensorParallel | ContextParallel] = (),
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """``sequence_balance_loss`` from some of the rows of ``n_seqs`` sequences of ``seq_len`` tokens (``scores:
    [n, N_r]``, ``indices: [n, K_r]``): each of the ``ranks`` sums its rows' statistics per sequence, and the sums
    are added over them (``sum_partials``: a tensor-parallel MoE layer routes a split of the tokens, a
    context-parallel one its chunks). ``seq_ids: [n]``: each row's sequence, or None where the rows are
    ``n_seqs`` sequences' equal, contiguous parts (nothing more is kept). ``valid: [n]`` (1 or 0): which rows
    count; a mask rather than a selection, so that nothing waits for the device."""
    n_experts, topk = scores.shape[-1], indices.shape[-1]
    fractions = scores / scores.sum(dim=-1, keepdim=True)
    ones = torch.ones(indices.shape, dtype=scores.dtype, device=scores.device)
    if valid is not None:
        fractions, ones = fractions * valid[:, None], ones * valid[:, None]
    if seq_ids is None:
        shares = fractions.view(n_seqs, -1, n_experts).sum(dim=1)
        counts = scores.new_zeros(n_seqs, n_experts).scatter_add_(1, indices.reshape(n_seqs, -1), ones.view(n_seqs, -1))
    else:
        shares = SumRows.apply(fractions, seq_ids, n_seqs)  # keeps the ids only, not the fractions
        picks = (seq_ids[:, None] * n_experts + indices).flatten()
        counts = scores.new_zeros(n_seqs * n_experts).scatter_add_(0, picks, ones.flatten()).view(n_seqs, n_experts)
    for group in ranks:
        if group.enabled:
            counts, shares = group.sum_partials(torch.stack([counts, shares])).unbind(0)
    f = counts.detach() * (n_experts / (topk * seq_len))
    return alpha * (f * (shares / seq_len)).sum(dim=-1).mean()


def take_balance_loss(layers: list[MoE], like: torch.Tensor) -> torch.Tensor:
    """Sum (and clear) the sequence-wise balance losses ``layers`` left during their training forward."""
    total = like.new_zeros(())
    for moe in layers:
        if moe.balance_loss is not None:
            total = total + moe.balance_loss
            moe.balance_loss = None
    return total


def max_violation(loads: torch.Tensor) -> float:
    """Max over layers of ``(max_i load_i - mean load) / mean load`` (0 for an empty or unloaded layer);
    ``loads`` is ``[n_layers, n_experts]`` or one layer's ``[n_experts]``."""
    loads = loads.float().reshape(-1, loads.shape[-1])
    if loads.numel() == 0:
        return 0.0
    mean = loads.mean(dim=-1)
    vio = torch.where(mean > 0, (loads.amax(dim=-1) - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))
    return vio.max().item()
