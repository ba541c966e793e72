"""DeepSeek-V3 (MLA + DeepSeekMoE + MTP), single-device model code."""

from haillm.models.deepseek_v3.args import PRESETS, ModelArgs, get_preset
from haillm.models.deepseek_v3.balance import max_violation
from haillm.models.deepseek_v3.flops import count_params, flops_per_token, mtp_params
from haillm.models.deepseek_v3.model import DeepSeekV3, InferenceCache, init_weights
from haillm.models.deepseek_v3.moe import LocalDispatcher

__all__ = [
    "PRESETS",
    "DeepSeekV3",
    "InferenceCache",
    "LocalDispatcher",
    "ModelArgs",
    "count_params",
    "flops_per_token",
    "get_preset",
    "init_weights",
    "max_violation",
    "mtp_params",
]
