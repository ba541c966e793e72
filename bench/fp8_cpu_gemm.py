"""Cost of the CPU FP8 path (reference GEMM with per-128-K promotion, eager quantization) against fp32.

    PYTHONPATH=. python bench/fp8_cpu_gemm.py [--threads 1]

Prints, per shape, fp32 and FP8 times of a GEMM alone and of a linear's forward + backward, the FP8/fp32
ratio and the accuracy (``calc_diff`` against float64). On CPU the FP8 path only emulates the numerics; the
ratio says how much slower CPU FP8 runs (tests, fidelity benchmark) are, not anything about GPU speed.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from haillm.fp8 import act_quant, calc_diff, fp8_gemm, fp8_linear, weight_quant

SHAPES = [(512, 512, 1024), (2048, 1024, 1024), (1024, 2048, 512)]  # (tokens, in features, out features)


def best_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def linear_step(linear, x, w, dy):
    x.grad = w.grad = None
    linear(x, w).backward(dy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; times are best of 5, ms")
    print(
        f"{'T':>5} {'K':>5} {'N':>5}  {'gemm fp32':>9} {'gemm fp8':>8} {'ratio':>5}  "
        f"{'linear fp32':>11} {'linear fp8':>10} {'ratio':>5}  {'calc_diff':>9}"
    )
    for t, k, n in SHAPES:
        x = torch.randn(t, k, requires_grad=True)
        w = (torch.randn(n, k) / k**0.5).requires_grad_()
        dy = torch.randn(t, n)
        xq, wq = act_quant(x.detach()), weight_quant(w.detach())
        g32 = best_ms(lambda x=x, w=w: x.detach() @ w.detach().T)
        g8 = best_ms(lambda xq=xq, wq=wq: fp8_gemm(*xq, *wq, out_dtype=torch.float32))
        l32 = best_ms(lambda x=x, w=w, dy=dy: linear_step(F.linear, x, w, dy))
        l8 = best_ms(lambda x=x, w=w, dy=dy: linear_step(fp8_linear, x, w, dy))
        diff = calc_diff(fp8_linear(x, w), x.double() @ w.double().T)
        print(
            f"{t:>5} {k:>5} {n:>5}  {g32:9.2f} {g8:8.2f} {g8 / g32:5.1f}  "
            f"{l32:11.2f} {l8:10.2f} {l8 / l32:5.1f}  {diff:9.2e}"
        )


if __name__ == "__main__":
    main()
