"""Blockwise FP8 numerics (DeepSeek-V3 recipe): quantization, FP8 GEMM, FP8 linear."""

from haillm.fp8.gemm import (
    calc_diff,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_gemm_scaled_mm,
    scaled_mm_supported,
)
from haillm.fp8.linear import Fp8LinearFunction, Fp8WeightCache, fp8_dgrad, fp8_linear, fp8_wgrad
from haillm.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    GRAD_AMAX_MIN,
    act_dequant,
    act_quant,
    act_quant_t,
    requant_t,
    scale_from_amax,
    weight_dequant,
    weight_quant,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "GRAD_AMAX_MIN",
    "Fp8LinearFunction",
    "Fp8WeightCache",
    "act_dequant",
    "act_quant",
    "act_quant_t",
    "calc_diff",
    "fp8_dgrad",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_gemm_scaled_mm",
    "fp8_linear",
    "fp8_wgrad",
    "requant_t",
    "scale_from_amax",
    "scaled_mm_supported",
    "weight_dequant",
    "weight_quant",
]
