"""Numerics every layer uses. Model code builds on these so that FP8, TP and weight-grad deferral can be
added in one place later."""

from haillm.ops.linear import Linear
from haillm.ops.norm import RMSNorm

__all__ = ["Linear", "RMSNorm"]
