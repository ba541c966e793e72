"""Gate weights travelling with their token copies (``AllToAllDispatcher`` with ``weights_inside``): one fp32
number per row packed into the row's own payload, so that one exchange carries both and its reverse exchange
both gradients."""

import torch


class PackRows(torch.autograd.Function):
    """Rows ``[n, dim]`` and one fp32 number per row as one ``[n, dim + c]`` tensor of the rows' dtype, the
    number's bits in the last ``c = 4 / itemsize`` columns: one exchange moves both, and its backward moves
    both gradients. Only copies touch the packed bits (never arithmetic, which could alter them)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        ctx.dim = rows.shape[1]
        return torch.cat([rows, probs.float().unsqueeze(1).view(rows.dtype)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, : ctx.dim], grad[:, ctx.dim :].contiguous().view(torch.float32).squeeze(1)


class UnpackRows(torch.autograd.Function):
    """A received ``PackRows`` tensor as its rows and numbers, each reordered by the permutation ``arrange``."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, dim: int, arrange: torch.Tensor):
        ctx.save_for_backward(arrange)
        ctx.shape, ctx.dtype = (packed.shape[0], dim, packed.shape[1] - dim), packed.dtype
        ctx.set_materialize_grads(False)
        probs = packed[:, dim:].contiguous().view(torch.float32).squeeze(1)
        return packed[:, :dim].index_select(0, arrange), probs.index_select(0, arrange)

    @staticmethod
    def backward(ctx, d_rows: torch.Tensor | None, d_probs: torch.Tensor | None):
        (arrange,) = ctx.saved_tensors
        n, dim, c = ctx.shape
        grad = torch.zeros(n, dim + c, dtype=ctx.dtype, device=arrange.device)
        if d_rows is not None:
            grad[:, :dim].index_add_(0, arrange, d_rows)
        if d_probs is not None:
            bits = torch.zeros(n, dtype=torch.float32, device=arrange.device).index_copy_(0, arrange, d_probs.float())
            grad[:, dim:] = bits.unsqueeze(1).view(ctx.dtype)
        return grad, None, None
