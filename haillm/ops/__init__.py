"""Numerics every layer uses. Model code builds on these so that FP8, TP and weight-grad deferral can be
added in one place later."""

from haillm.ops import precision
from haillm.ops.linear import Linear, set_weight_grad_deferral
from haillm.ops.norm import RMSNorm
from haillm.ops.wgrad import deferrable_linear, deferring_weight_grads

__all__ = ["Linear", "RMSNorm", "precision", "deferrable_linear", "deferring_weight_grads", "set_weight_grad_deferral"]
