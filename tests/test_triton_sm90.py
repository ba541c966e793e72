"""Every Triton kernel compiled for an SM90 GPU (H100/H200) here, without a GPU.

The tests marked ``gpu`` run the kernels, but only where a GPU is lent, and Triton's CPU interpreter checks
indexing, not what the GPU compiler makes of a kernel. Triton compiles ahead of time for any target it is
told about: a stand-in driver names SM90, and each launcher of ``haillm.fp8.triton_*`` is called on CPU
tensors of DeepSeek-V3's (and V2-Lite's) shapes with the launch replaced by ``warmup`` (compile, do not run).
The JIT specializes the arguments as it does on a GPU (16-byte aligned pointers, integers equal to 1 or
multiples of 16), so the code checked is the code a GPU would run:

- it compiles: Triton's passes for sm_90 and ptxas;
- shared memory within the 227 KiB an SM90 block may use, and no register spills (ptxas's stack frame, read
  from the cubin with the cuobjdump that Triton ships);
- the memory-bound kernels read and write global memory in 16-byte vectors (not one element per access);
- the GEMM kernels' K loops are software-pipelined: their operands arrive by asynchronous copies issued
  ``num_stages - 1`` steps ahead of the tensor cores, not by loads that stall every step.

Skipped without Triton (a dev dependency on Linux x86-64) and on a machine with CUDA, where the ``gpu``
tests run the kernels themselves.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a GPU is here: the gpu tests run the kernels", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as driver_config  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from haillm.fp8 import triton_fused, triton_grouped, triton_quant  # noqa: E402

SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may opt into on H100/H200
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


class _Sm90Driver:
    """Just enough of a Triton driver for the JIT to compile for SM90 where there is no GPU."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compiled_for_sm90() -> Iterator[list]:
    """Within the block every kernel launch compiles for SM90 and returns without running; yields the list
    of compiled kernels, in launch order."""
    kernels: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernels.append(run(self, *args, grid=grid, warmup=True, **kwargs))
        return kernels[-1]

    previous = driver_config._active  # the driver in use; creating the default one needs a GPU
    driver_config.set_active(_Sm90Driver())
    JITFunction.run = compile_only
    try:
        yield kernels
    finally:
        JITFunction.run = run
        driver_config._active = previous


def stack_bytes(kernel) -> int:
    """ptxas's per-thread stack frame: the registers it spilled to local memory (0 when none)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def widest_global_access(kernel, op: str = "ld") -> int:
    """Bytes per thread of the widest global load (``op="st"``: store) in the PTX (``ld.global.v4.b32``: 16)."""
    widths = [int(v or 1) * int(bits) // 8
              for v, bits in re.findall(op + r"\.global(?:\.[a-z]\w*)*?(?:\.v(\d))?\.[bfsu](\d+)", kernel.asm["ptx"])]
    return max(widths, default=0)


def async_copies(kernel) -> int:
    return kernel.asm["ttgir"].count("async_copy_global_to_local")


def _rows(t: int, k: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(t, k, dtype=dtype)


def _scales(t: int, k: int) -> torch.Tensor:
    return torch.empty(t, -(-k // 128))


def _group_gemm(groups: int, n: int, k: int, dgrad: bool) -> None:
    """Fprop ``x @ W[g].T`` of 4096 rows, or Dgrad ``dy @ W[g]`` reading the transposed stack in the layout
    the stack's quantization writes it (so that kernel is compiled too)."""
    offs = torch.zeros(groups, dtype=torch.int32)
    if dgrad:
        _, _, w_t, w_t_s = triton_quant.weight_quant_stack(torch.empty(groups, n, k, dtype=BF16), False, True)
        triton_grouped.group_gemm(_rows(4096, n, FP8), _scales(4096, n), w_t, w_t_s, offs, BF16)
    else:
        w, w_s = torch.empty(groups, n, k, dtype=FP8), torch.empty(groups, -(-n // 128), -(-k // 128))
        triton_grouped.group_gemm(_rows(4096, k, FP8), _scales(4096, k), w, w_s, offs, BF16)


def _k_grouped_gemm(groups: int, n: int, k: int) -> None:
    """The experts' FP8 Wgrad ``dy[g].T @ x[g]`` on the aligned token layout of 4096 rows."""
    padded = 4096 + 128 * groups
    starts = torch.zeros(groups, dtype=torch.int32)
    triton_grouped.k_grouped_gemm(_rows(n, padded, FP8), _scales(n, padded), _rows(k, padded, FP8),
                                  _scales(k, padded), starts, starts, torch.float32)


MEMORY_BOUND: dict[str, Callable[[], object]] = {
    "act_quant": lambda: triton_quant.act_quant(_rows(4096, 7168), False, 1e-4),
    "act_quant pow2, fp32": lambda: triton_quant.act_quant(_rows(4096, 2048, torch.float32), True, 1e-4),
    "act_quant_t": lambda: triton_quant.act_quant_t(_rows(4096, 7168), False, 1e-4),
    "act_quant_with_t": lambda: triton_quant.act_quant_with_t(_rows(4096, 2048), False, 1e-30),
    "requant_t": lambda: triton_quant.requant_t(_rows(4096, 7168, FP8), _scales(4096, 7168), False),
    "act_dequant bf16": lambda: triton_quant.act_dequant(_rows(4096, 7168, FP8), _scales(4096, 7168), BF16),
    "act_dequant bf16, K 576": lambda: triton_quant.act_dequant(_rows(4096, 576, FP8), _scales(4096, 576), BF16),
    "act_dequant fp32, K 2112": lambda: triton_quant.act_dequant(_rows(4096, 2112, FP8), _scales(4096, 2112),
                                                                 torch.float32),
    "weight_quant": lambda: triton_quant.weight_quant(_rows(2048, 7168), False, transposed=False),
    "weight_quant with W.T": lambda: triton_quant.weight_quant(_rows(7168, 2048), False, transposed=True),
    "weight_quant_stack": lambda: triton_quant.weight_quant_stack(torch.empty(2, 2048, 7168, dtype=BF16), False),
    "rmsnorm_act_quant 7168": lambda: triton_fused.rmsnorm_act_quant(_rows(4096, 7168), torch.empty(7168),
                                                                     1e-6, False),
    "rmsnorm_act_quant q_norm": lambda: triton_fused.rmsnorm_act_quant(_rows(4096, 1536), torch.empty(1536),
                                                                       1e-6, False),
    "rmsnorm_act_quant kv_norm": lambda: triton_fused.rmsnorm_act_quant(_rows(4096, 576)[:, :512],
                                                                        torch.empty(512), 1e-6, False),
    "swiglu_act_quant": lambda: triton_fused.swiglu_act_quant(_rows(4096, 2048), _rows(4096, 2048), False),
    "swiglu_act_quant V2-Lite": lambda: triton_fused.swiglu_act_quant(_rows(4096, 1408), _rows(4096, 1408), False),
}

# name -> (launch, operands that must arrive by asynchronous copies, stages)
GEMMS: dict[str, tuple[Callable[[], object], int, int]] = {
    "experts Fprop V3 w1": (lambda: _group_gemm(8, 2048, 7168, dgrad=False), 2, triton_grouped.NUM_STAGES),
    "experts Fprop V3 w2": (lambda: _group_gemm(8, 7168, 2048, dgrad=False), 2, triton_grouped.NUM_STAGES),
    "experts Fprop V2-Lite w1": (lambda: _group_gemm(64, 1408, 2048, dgrad=False), 2, triton_grouped.NUM_STAGES),
    # Dgrad reads the transposed stack the quantization writes K-major. (Read as a view of W, N-major, the
    # weight tiles were not copied ahead: FP8 wgmma takes both operands K-major.)
    "experts Dgrad V3 w1": (lambda: _group_gemm(8, 2048, 7168, dgrad=True), 2, triton_grouped.NUM_STAGES),
    "experts Dgrad V2-Lite w2": (lambda: _group_gemm(64, 2048, 1408, dgrad=True), 2, triton_grouped.NUM_STAGES),
    "experts Wgrad V3 w1": (lambda: _k_grouped_gemm(8, 2048, 7168), 2, triton_grouped.WGRAD_STAGES),
    "experts Wgrad V2-Lite w2": (lambda: _k_grouped_gemm(64, 2048, 1408), 2, triton_grouped.WGRAD_STAGES),
}


def _compile(launch: Callable[[], object]) -> list:
    with compiled_for_sm90() as kernels:
        launch()
    assert kernels, "nothing was launched"
    return kernels


def _check_resources(kernel) -> None:
    name = kernel.metadata.name
    assert kernel.metadata.shared <= SM90_SHARED_BYTES, f"{name}: {kernel.metadata.shared} bytes of shared memory"
    assert stack_bytes(kernel) == 0, f"{name}: ptxas spilled registers ({stack_bytes(kernel)}-byte stack)"


@pytest.mark.parametrize("case", list(MEMORY_BOUND))
def test_memory_bound_kernels_compile_with_vector_loads_and_no_spills(case):
    for kernel in _compile(MEMORY_BOUND[case]):
        _check_resources(kernel)
        assert widest_global_access(kernel) >= 16, f"{kernel.metadata.name}: {widest_global_access(kernel)}-byte loads"
        assert widest_global_access(kernel, "st") >= 16, f"{kernel.metadata.name}: narrow stores"


@pytest.mark.parametrize("case", list(GEMMS))
def test_gemm_kernels_compile_pipelined_and_without_spills(case):
    launch, operands, stages = GEMMS[case]
    *quantization, kernel = _compile(launch)
    for k in (*quantization, kernel):
        _check_resources(k)
    assert kernel.metadata.num_stages == stages
    # Each pipelined operand load appears once per prologue stage and once in the loop body.
    assert async_copies(kernel) >= operands * stages, f"{case}: {async_copies(kernel)} asynchronous copies"


EDGE_SHAPES: dict[str, Callable[[], object]] = {
    "act_quant 1 token": lambda: triton_quant.act_quant(_rows(1, 7168), False, 1e-4),
    "act_quant 1 channel": lambda: triton_quant.act_quant(_rows(37, 1), False, 1e-4),
    "act_quant_with_t 1 x 1": lambda: triton_quant.act_quant_with_t(_rows(1, 1), False, 1e-4),
    "requant_t 1 token": lambda: triton_quant.requant_t(_rows(1, 7168, FP8), _scales(1, 7168), False),
    "act_dequant 1 token": lambda: triton_quant.act_dequant(_rows(1, 7168, FP8), _scales(1, 7168), BF16),
    "act_dequant 1 channel": lambda: triton_quant.act_dequant(_rows(37, 1, FP8), _scales(37, 1), torch.float16),
    "weight_quant 1 x 1": lambda: triton_quant.weight_quant(_rows(1, 1), False, transposed=True),
    "rmsnorm_act_quant 1 token": lambda: triton_fused.rmsnorm_act_quant(_rows(1, 7168), torch.empty(7168),
                                                                        1e-6, False),
    "rmsnorm_act_quant width 1": lambda: triton_fused.rmsnorm_act_quant(_rows(5, 1), torch.empty(1), 1e-6, False),
    "swiglu_act_quant 1 x 1": lambda: triton_fused.swiglu_act_quant(_rows(1, 1), _rows(1, 1), False),
    "experts one group, widths 1": lambda: _group_gemm(1, 1, 1, dgrad=False),
    "experts Wgrad one group, widths 1": lambda: _k_grouped_gemm(1, 1, 1),
}


@pytest.mark.parametrize("case", list(EDGE_SHAPES))
def test_kernels_compile_for_extreme_sizes(case):
    """A size of 1 is specialized to a compile-time constant and an odd width loses alignment: both compile."""
    for kernel in _compile(EDGE_SHAPES[case]):
        _check_resources(kernel)


def test_the_checks_can_fail():
    """The probes see what they claim: a plain elementwise kernel with a per-element mask on an unaligned
    width reads one element at a time, and a 4-byte load is measured as such."""
    assert widest_global_access(type("K", (), {"asm": {"ptx": "ld.global.b32 %r1, [%rd1];"}})) == 4
    assert widest_global_access(type("K", (), {"asm": {"ptx": "ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];"}})) == 16
    assert widest_global_access(type("K", (), {"asm": {"ptx": "st.global.v2.b16 [%rd1], {%h1,%h2};"}}), "st") == 4
    (kernel,) = _compile(lambda: triton_quant.act_quant(_rows(4096, 7000), False, 1e-4))
    assert widest_global_access(kernel) < 16  # 7000 columns: rows start at 2-byte offsets only
