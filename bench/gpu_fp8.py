"""FP8 blockwise GEMM on a Hopper GPU: accuracy of ``F.scaled_mm`` against haillm's reference semantics,
and FP8 vs BF16 GEMM throughput on DeepSeek-V3 shapes.

    PYTHONPATH=. python bench/gpu_fp8.py            # from the repository root; about a minute on H100/H200
    PYTHONPATH=. python bench/gpu_fp8.py --iters 50

1. Accuracy (DeepGEMM's metric ``calc_diff``, float64): for each shape, ``fp8_gemm`` (cuBLAS through
   ``F.scaled_mm``) against ``fp8_gemm_reference`` run on the same FP8 operands (same semantics: must agree
   to fp32 rounding) and against the fp32 product of the original bf16 inputs (DeepGEMM's bound: < 1e-3).
   Shapes cuBLAS does not take as they are (N = 2112) run zero-padded ("padded").
   Both recipes: 1x128 x 128x128 (Fprop/Dgrad) and 1x128 x 1x128 (Wgrad).
2. Throughput: BF16 ``torch.mm`` vs FP8 ``fp8_gemm`` on pre-quantized operands, and FP8 including the
   activation quantization (``act_quant``: the Triton kernel on CUDA), timed with CUDA events; the FP8
   linear's forward+backward against BF16's per shape, in both Wgrad modes (``fp8.wgrad``); then each
   quantization kernel against its eager-torch reference (``*_reference``) on the same tensors.
   Routed experts (``grouped_throughput``): BF16 ``torch._grouped_mm`` vs the Triton grouped FP8 GEMM
   (``fp8_group_gemm``; pre-quantized, and including ``act_quant``) on V2-Lite's and a V3-like rank's expert
   GEMMs: Fprop of the up- and down-projections and the up-projection's Dgrad through the K-major transposed
   stack the experts cache (``weight_quant_with_t``);
   then both projections' weight gradients, BF16 ``group_wgrad`` vs the k-grouped FP8 Wgrad (the GEMM alone
   on operands already in the aligned token layout, and ``fp8_group_wgrad`` with its layout scatter,
   ``act_quant_t`` of ``dy`` and ``requant_t`` of the FP8 ``x`` kept from forward): whether FP8 Wgrad
   pays for the experts.
   Fused producers (``fused_speed``): ``haillm.fp8.fused``'s RMSNorm or SwiGLU writing their FP8 copy
   in one kernel, against the unfused eager path (torch RMSNorm or ``F.silu(a) * b``, then ``act_quant``).
3. Alignment probe (last, in case a rejected call upsets the context): which M values cuBLAS accepts, to
   check ``scaled_mm_supported``'s conservative rule (M a multiple of 4).

FP8 against BF16 training steps of the trainer itself: ``bench/gpu_train.py``.

Without CUDA it prints one line and exits 0.
"""

import argparse
import functools
import statistics
import sys

import torch
import torch.nn.functional as F

from haillm.fp8 import (
    Fp8WeightCache,
    act_quant,
    calc_diff,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_gemm_scaled_mm,
    fp8_linear,
    quant,
    scaled_mm_supported,
    weight_quant,
)
from haillm.fp8.fused import rmsnorm_act_quant, swiglu_act_quant
from haillm.fp8.grouped import fp8_group_gemm, fp8_group_wgrad, fp8_k_grouped_gemm, wgrad_operands
from haillm.fp8.quant import weight_quant_with_t
from haillm.models.deepseek_v3.experts import group_wgrad
from haillm.ops.norm import rms_norm_with_rstd

# Widths of V3's fused producers: RMSNorm over dim, q_lora_rank, kv_lora_rank; SwiGLU over the expert and the
# dense FFN widths (moe_inter_dim, V2-Lite's 1408, inter_dim).
NORM_WIDTHS = [7168, 1536, 512]
SWIGLU_WIDTHS = [2048, 1408, 18432]
# (k, n) pairs of DeepGEMM's test (DeepSeek-V3 projections and experts), plus the expert up-projection.
V3_KN = [(7168, 2048), (7168, 4096), (2048, 7168), (7168, 2112), (1536, 24576), (512, 32768), (16384, 7168)]
ACCURACY_M = [128, 4096]
BENCH_M = 4096
WGRAD_SHAPES = [(2048, 4096, 7168), (7168, 4096, 2048)]  # (out features, tokens, in features) of dW
# Routed experts of one rank: (name, experts, dim, inter, rows = tokens x routed experts per token).
EXPERT_CASES = [("V2-Lite", 64, 2048, 1408, 8192 * 6), ("V3-like", 8, 7168, 2048, 32768)]


def quantized(m: int, k: int, n: int, b_block: int, device: str):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    b, b_s = weight_quant(w) if b_block == 128 else act_quant(w)
    return x, w, (*act_quant(x), b, b_s)


def accuracy(device: str) -> bool:
    print("\n== accuracy: scaled_mm vs reference semantics and vs the fp32 product of the bf16 inputs ==")
    print(f"{'recipe':>10} {'m':>5} {'k':>6} {'n':>6}  {'vs reference':>12}  {'vs high precision':>17}  ok")
    all_ok = True
    cases = [(128, m, k, n) for m in ACCURACY_M for k, n in V3_KN]
    cases += [(1, n_out, tokens, k_in) for n_out, tokens, k_in in WGRAD_SHAPES]
    for b_block, m, k, n in cases:
        x, w, args = quantized(m, k, n, b_block, device)
        out32 = fp8_gemm(*args, out_dtype=torch.float32, b_block=b_block)
        out16 = fp8_gemm(*args, out_dtype=torch.bfloat16, b_block=b_block)
        d_ref = calc_diff(out32, fp8_gemm_reference(*args, b_block=b_block))
        d_hp = calc_diff(out16, x.float() @ w.float().T)
        ok = d_ref < 1e-6 and d_hp < 1e-3
        all_ok &= ok
        recipe = "1x128" if b_block == 1 else "128x128"
        padded = " (padded)" if not scaled_mm_supported(args[0], args[2], b_block, torch.float32) else ""
        print(f"{recipe:>10} {m:>5} {k:>6} {n:>6}  {d_ref:12.3e}  {d_hp:17.3e}  {'yes' if ok else 'NO'}{padded}")
    return all_ok


def alignment_probe(device: str) -> None:
    print("\n== alignment probe: direct scaled_mm calls (k=512, n=256) ==")
    for m in (1, 2, 4, 8, 100, 130):
        _, _, args = quantized(m, 512, 256, 128, device)
        try:
            out = fp8_gemm_scaled_mm(*args, torch.float32)
            res = f"ok, calc_diff vs reference {calc_diff(out, fp8_gemm_reference(*args)):.2e}"
        except Exception as e:  # cuBLAS/torch checks raise RuntimeError, ValueError or NotImplementedError
            res = "error: " + str(e).splitlines()[0][:100]
        taken = scaled_mm_supported(args[0], args[2], 128, torch.float32)
        print(f"m={m:>4}: {res}   (scaled_mm_supported: {taken})")


def cuda_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def throughput(device: str, iters: int) -> None:
    print(f"\n== throughput (TFLOP/s, median of {iters}; FP8 operands pre-quantized unless noted) ==")
    head = f"{'recipe':>8} {'m':>5} {'k':>6} {'n':>6}  {'bf16':>7}  {'fp8':>7}  {'fp8/bf16':>8}"
    print(head + f"  {'fp8+act_quant':>13}")
    cases = [(128, BENCH_M, k, n) for k, n in V3_KN]
    cases += [(1, n_out, tokens, k_in) for n_out, tokens, k_in in WGRAD_SHAPES]
    for b_block, m, k, n in cases:
        x, w, args = quantized(m, k, n, b_block, device)
        flops = 2 * m * n * k
        t_bf16 = cuda_ms(lambda x=x, w=w: torch.mm(x, w.t()), iters)
        t_fp8 = cuda_ms(lambda args=args, bb=b_block: fp8_gemm(*args, b_block=bb), iters)

        def fp8_with_quant(x=x, b=args[2], b_s=args[3], bb=b_block):
            return fp8_gemm(*act_quant(x), b, b_s, b_block=bb)

        t_fp8q = cuda_ms(fp8_with_quant, iters)
        tf = [flops / t / 1e9 for t in (t_bf16, t_fp8, t_fp8q)]
        recipe = "wgrad" if b_block == 1 else "fprop"
        row = f"{recipe:>8} {m:>5} {k:>6} {n:>6}  {tf[0]:7.0f}  {tf[1]:7.0f}  {tf[1] / tf[0]:8.2f}"
        print(row + f"  {tf[2]:13.0f}")
    x, w, args = quantized(BENCH_M, 7168, 2048, 128, device)
    t_ref = cuda_ms(lambda: fp8_gemm_reference(*args), max(3, iters // 5))
    tflops = 2 * BENCH_M * 7168 * 2048 / t_ref / 1e9
    print(f"reference fallback (fp32 bmm), m={BENCH_M} k=7168 n=2048: {tflops:.0f} TFLOP/s")


def linear_speed(device: str, iters: int) -> None:
    """FP8 linear forward+backward (Fprop, Dgrad, Wgrad and every activation/gradient quantization) against
    the BF16 linear, per V3 shape at M = BENCH_M tokens, in both Wgrad modes. The weight is quantized once
    per optimizer step in training (``Fp8WeightCache``, with the transposed copy Dgrad reads, as ``ops.Linear``
    caches it), so "cached" is the per-micro-batch cost; the last column also pays that weight quantization
    on every call (one micro-batch per step)."""
    print(f"\n== FP8 linear forward+backward vs BF16 (ms, median of {iters}; M = {BENCH_M}) ==")
    print(f"{'k':>6} {'n':>6}  {'bf16':>6}  {'fp8 wgrad=bf16':>14}  {'fp8 wgrad=fp8':>13}  {'+weight quant':>13}")
    for k, n in V3_KN:
        x = torch.randn(BENCH_M, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(BENCH_M, n, device=device, dtype=torch.bfloat16)
        cache = Fp8WeightCache(w.detach(), transposed=True)
        w_q, w_pad = cache.get(), cache.padded()  # padded: V3's 576 and 2112 (kept per step, as ops.Linear does)

        def step(forward, x=x, w=w, dy=dy):
            x.grad = w.grad = None
            forward().backward(dy)

        times = [cuda_ms(functools.partial(step, fwd), iters) for fwd in (
            lambda x=x, w=w: torch.nn.functional.linear(x, w),
            lambda x=x, w=w, w_q=w_q, p=w_pad: fp8_linear(x, w, weight_q=w_q, weight_padded=p, wgrad="bf16"),
            lambda x=x, w=w, w_q=w_q, p=w_pad: fp8_linear(x, w, weight_q=w_q, weight_padded=p, wgrad="fp8"),
            lambda x=x, w=w: fp8_linear(x, w, weight_q=weight_quant_with_t(w.detach()), wgrad="bf16"),
        )]
        ratios = "".join(f"  {times[0] / t:>12.2f}x" for t in times[1:])
        print(f"{k:>6} {n:>6}  {times[0]:6.3f}{ratios}")


def quant_speed(device: str, iters: int) -> None:
    """Quantization kernels vs the eager reference at M = BENCH_M tokens (bf16 in), and their bandwidth."""
    print(f"\n== quantization: Triton kernel vs eager torch reference (us, median of {iters}; bf16 [{BENCH_M}, k]) ==")
    print(f"{'op':>20} {'k':>6}  {'reference':>9}  {'kernel':>7}  {'speedup':>7}  {'kernel GB/s':>11}")
    for k in sorted({k for k, _ in V3_KN}):
        x = torch.randn(BENCH_M, k, device=device, dtype=torch.bfloat16)
        q, s = quant.act_quant(x)
        ops = [  # (name, kernel, reference, arguments, bytes per element read + written by the kernel)
            ("act_quant", quant.act_quant, quant.act_quant_reference, (x,), 3),
            ("act_quant_with_t", quant.act_quant_with_t, quant.act_quant_with_t_reference, (x,), 4),
            ("requant_t", quant.requant_t, quant.requant_t_reference, (q, s), 2),
            ("weight_quant_with_t", quant.weight_quant_with_t, quant.weight_quant_with_t_reference, (x,), 4),
        ]
        for name, kernel, reference, op_args, nbytes in ops:
            t_ref = cuda_ms(functools.partial(reference, *op_args), iters)
            t_k = cuda_ms(functools.partial(kernel, *op_args), iters)
            gbs = nbytes * x.numel() / t_k / 1e6
            print(f"{name:>20} {k:>6}  {t_ref * 1e3:9.0f}  {t_k * 1e3:7.0f}  {t_ref / t_k:7.1f}x  {gbs:11.0f}")


def routed_counts(rows: int, experts: int, device: str) -> torch.Tensor:
    """Uneven per-expert row counts summing to ``rows`` (a skewed router), with one idle expert."""
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(experts)) + 0.25
    weights[experts // 2] = 0.0
    counts = (weights / weights.sum() * rows).floor().long()
    counts[0] += rows - counts.sum()
    return counts.to(device)


def grouped_throughput(device: str, iters: int) -> None:
    """Routed-expert GEMMs: BF16 grouped GEMMs against the grouped FP8 kernels, pre-quantized and with the
    quantizations each needs in training (Fprop/Dgrad: ``act_quant`` of the activation; Wgrad: the aligned
    layout, ``act_quant_t(dy)`` and ``requant_t`` of the saved FP8 ``x``); the weights are quantized once per
    step, so outside the timing."""
    print(f"\n== routed experts: grouped GEMM (TFLOP/s, median of {iters}; uneven rows, one idle expert) ==")
    print(f"{'model':>8} {'gemm':>10} {'E':>3} {'rows':>6} {'k':>5} {'n':>5}  {'bf16':>6}  {'fp8':>6}  "
          f"{'fp8/bf16':>8}  {'fp8+act_quant':>13}  {'ratio':>5}  {'calc_diff vs bf16':>17}")
    for case in EXPERT_CASES:
        grouped_case(*case, device, iters)


def grouped_case(name: str, experts: int, dim: int, inter: int, rows: int, device: str, iters: int) -> None:
    """One ``EXPERT_CASES`` row set: three grouped GEMMs (Fprop up and down, Dgrad up) and both Wgrads."""
    offs = torch.cumsum(routed_counts(rows, experts, device), 0, dtype=torch.int32)

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    def row(label: str, k: int, n: int, fns: tuple) -> None:
        """Times ``fns`` = (BF16, FP8 pre-quantized, FP8 with its quantizations); FP8's calc_diff vs BF16."""
        tf = [2 * rows * k * n / cuda_ms(fn, iters) / 1e9 for fn in fns]
        diff = calc_diff(fns[2]().float(), fns[0]().float())
        print(f"{name:>8} {label:>10} {experts:>3} {rows:>6} {k:>5} {n:>5}  {tf[0]:6.0f}  {tf[1]:6.0f}  "
              f"{tf[1] / tf[0]:8.2f}  {tf[2]:13.0f}  {tf[2] / tf[0]:5.2f}  {diff:17.1e}")

    w_up, w_down = bf16(experts, inter, dim) * 0.02, bf16(experts, dim, inter) * 0.02
    # as the experts cache them: each stack with its K-major transpose, which Dgrad reads
    (up_q, up_s, up_tq, up_ts), (down_q, down_s, _, _) = weight_quant_with_t(w_up), weight_quant_with_t(w_down)
    gemms = [  # (label, activation [rows, k], bf16 weight as [E, k, n], FP8 weight [E, n, k] + scales)
        ("fprop up", bf16(rows, dim), w_up.transpose(1, 2), up_q, up_s),
        ("fprop down", bf16(rows, inter), w_down.transpose(1, 2), down_q, down_s),
        ("dgrad up", bf16(rows, inter), w_up, up_tq, up_ts),
    ]
    for label, x, w_bf16, b, b_s in gemms:
        a, a_s = act_quant(x)
        row(label, x.shape[1], b.shape[1], (
            lambda x=x, w=w_bf16: torch._grouped_mm(x, w, offs=offs),
            lambda a=a, a_s=a_s, b=b, b_s=b_s: fp8_group_gemm(a, a_s, b, b_s, offs),
            lambda x=x, b=b, b_s=b_s: fp8_group_gemm(*act_quant(x), b, b_s, offs),
        ))
    # Wgrad dW[e] = dy[rows of e].T @ x[rows of e] contracts over the rows; k, n: dW's in and out widths
    for label, dy, x in (("wgrad up", bf16(rows, inter), bf16(rows, dim)),  # dW1 [E, inter, dim]
                         ("wgrad down", bf16(rows, dim), bf16(rows, inter))):  # dW2 [E, dim, inter]
        x_q, x_s = act_quant(x)  # the FP8 copy forward keeps
        ops = wgrad_operands(dy, x_q, x_s, offs)
        row(label, x.shape[1], dy.shape[1], (
            lambda dy=dy, x=x: group_wgrad(dy, x, offs),
            lambda ops=ops: fp8_k_grouped_gemm(*ops, torch.bfloat16),
            lambda dy=dy, x_q=x_q, x_s=x_s: fp8_group_wgrad(dy, x_q, x_s, offs, out_dtype=torch.bfloat16),
        ))


def fused_speed(device: str, iters: int) -> None:
    """Fused producers (one kernel: output and its FP8 copy) vs the unfused eager path, at BENCH_M tokens (bf16)."""
    print(f"\n== fused producers: one kernel vs op then act_quant (us, median of {iters}; bf16 [{BENCH_M}, k]) ==")
    print(f"{'op':>20} {'k':>6}  {'unfused':>7}  {'fused':>7}  {'speedup':>7}  {'fused GB/s':>10}")
    eps = 1e-6
    with torch.no_grad():
        for k in NORM_WIDTHS:
            x = torch.randn(BENCH_M, k, device=device, dtype=torch.bfloat16)
            w = torch.ones(k, device=device)
            t_unfused = cuda_ms(lambda x=x, w=w: act_quant(rms_norm_with_rstd(x, w, eps)[0]), iters)
            t_fused = cuda_ms(lambda x=x, w=w: rmsnorm_act_quant(x, w, eps), iters)
            gbs = 5 * x.numel() / t_fused / 1e6  # reads bf16 x; writes bf16 y and e4m3 q
            print(f"{'rmsnorm_act_quant':>20} {k:>6}  {t_unfused * 1e3:7.0f}  {t_fused * 1e3:7.0f}  "
                  f"{t_unfused / t_fused:6.1f}x  {gbs:10.0f}")
        for k in SWIGLU_WIDTHS:
            a, b = (torch.randn(BENCH_M, k, device=device, dtype=torch.bfloat16) for _ in range(2))
            t_unfused = cuda_ms(lambda a=a, b=b: act_quant(F.silu(a) * b), iters)
            t_fused = cuda_ms(lambda a=a, b=b: swiglu_act_quant(a, b), iters)
            gbs = 7 * a.numel() / t_fused / 1e6  # reads bf16 a, b; writes bf16 h and e4m3 q
            print(f"{'swiglu_act_quant':>20} {k:>6}  {t_unfused * 1e3:7.0f}  {t_fused * 1e3:7.0f}  "
                  f"{t_unfused / t_fused:6.1f}x  {gbs:10.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fp8: no CUDA device; this benchmark needs a Hopper (SM90) GPU, nothing to run.")
        return 0
    cap = torch.cuda.get_device_capability()
    print(
        f"device: {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )
    if cap[0] != 9:
        print("gpu_fp8: torch's 1x128/128x128 blockwise scaled_mm runs on SM90 only; nothing to run here.")
        return 0
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # the fp32 references must not run in TF32
    torch.manual_seed(0)
    ok = accuracy("cuda")
    throughput("cuda", args.iters)
    linear_speed("cuda", args.iters)
    quant_speed("cuda", args.iters)
    grouped_throughput("cuda", args.iters)
    fused_speed("cuda", args.iters)
    alignment_probe("cuda")
    print(f"\naccuracy: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
