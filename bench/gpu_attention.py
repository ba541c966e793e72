"""MLA's attention core on one GPU: which ``F.scaled_dot_product_attention`` backend serves q/k head dim
192 with v head dim 128 (DeepSeek-V2/V3), and whether padding v to 192 (the flash kernels want equal
head dims; the zero columns leave the output exact) pays for its 50% larger P·V.

    PYTHONPATH=. python bench/gpu_attention.py                  # V2-Lite shape: 2 x 4096 tokens, 16 heads
    PYTHONPATH=. python bench/gpu_attention.py --heads 128      # V3's heads

Forward + backward, causal, bf16, median of CUDA-event timings. Rows: torch's own choice for the unpadded
shapes, each backend forced (``torch.nn.attention.sdpa_kernel``) where it accepts them, and the same for v
padded to the q/k head dim. Today ``haillm.models.deepseek_v3.mla`` pads only on CPU (whose fused kernel
needs it); pad on the GPU too if a padded row is the fastest. Without CUDA it prints one line and exits 0.
"""

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from gpu_fp8 import cuda_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def fwd_bwd_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend | None, iters: int) -> float:
    """Median ms of one causal attention forward + backward (``None``: torch picks the backend)."""
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=q.dtype)

    def step() -> None:
        q.grad = k.grad = v.grad = None
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    return cuda_ms(step, iters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--qk-dim", type=int, default=192)
    parser.add_argument("--v-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    a = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device, nothing to run.")
        return 0
    print(f"== MLA attention core: {a.batch} x {a.seq} tokens, {a.heads} heads, q/k dim {a.qk_dim}, "
          f"v dim {a.v_dim}; fwd+bwd ms (median of {a.iters}) ==")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(dim: int) -> torch.Tensor:
        shape = (a.batch, a.heads, a.seq, dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    q, k, v = tensor(a.qk_dim), tensor(a.qk_dim), tensor(a.v_dim)
    v_pad = F.pad(v.detach(), (0, a.qk_dim - a.v_dim)).requires_grad_()
    # causal attention FLOPs: QK^T and P·V over half the score matrix, backward 2.5x forward
    flops = 3.5 * 2 * a.batch * a.heads * a.seq * a.seq / 2 * (a.qk_dim + a.v_dim)
    best = None
    for label, value in (("v", v), (f"v padded to {a.qk_dim}", v_pad)):
        for name, backend in [("torch's choice", None), *BACKENDS.items()]:
            try:
                ms = fwd_bwd_ms(q, k, value, backend, a.iters)
            except RuntimeError as exc:  # the backend does not take these shapes
                print(f"{label:>16}  {name:>15}: not available ({str(exc).splitlines()[0][:80]})")
                continue
            print(f"{label:>16}  {name:>15}: {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s (unpadded FLOPs)")
            if best is None or ms < best[0]:
                best = (ms, label, name)
    if best is not None:
        print(f"fastest: {best[1]}, {best[2]} ({best[0]:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
