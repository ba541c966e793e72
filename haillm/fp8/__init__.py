"""Blockwise FP8 numerics (DeepSeek-V3 recipe): quantization, FP8 GEMM, FP8 linear."""

from haillm.fp8.gemm import (
    blockwise_fp8_available,
    calc_diff,
    device_capability,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_gemm_scaled_mm,
    gemm_plan,
    pad_for_scaled_mm,
    scaled_mm_shape,
    scaled_mm_supported,
)
from haillm.fp8.grouped import fp8_group_gemm, fp8_group_gemm_reference, group_gemm_plan
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
    "blockwise_fp8_available",
    "calc_diff",
    "device_capability",
    "fp8_dgrad",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_gemm_scaled_mm",
    "fp8_group_gemm",
    "fp8_group_gemm_reference",
    "fp8_linear",
    "fp8_wgrad",
    "gemm_plan",
    "group_gemm_plan",
    "pad_for_scaled_mm",
    "requant_t",
    "scale_from_amax",
    "scaled_mm_shape",
    "scaled_mm_supported",
    "weight_dequant",
    "weight_quant",
]
