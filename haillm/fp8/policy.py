"""Which linears of a DeepSeek-V3 model run in FP8 (report §3.3, REFERENCE.md §3.2).

FP8 (all three GEMMs): every Linear of the transformer blocks — MLA's projections ``wq``/``wq_a``/``wq_b``/
``wkv_a``/``wkv_b``/``wo``, and ``w1``/``w2``/``w3`` of the dense FFN, the routed and the shared experts —
and the MTP projection ``eh_proj``. The report lists what stays in BF16/FP32: the embedding, the output
head, the MoE gate, the norms and the attention core. ``eh_proj`` is not among them, so it is an ordinary
Linear and goes FP8 (the report does not name it either way). The embedding, gate, norms and attention
core are not ``Linear`` modules here, so only ``head`` (and any Linear not named above) is kept by name.

Every width runs FP8: weights are quantized in 128x128 blocks with a partial last block (per expert for
the routed experts' stacks), activations in 1x128 tiles with a partial last tile, and the GPU GEMMs pad or
mask what is not whole blocks (``gemm.gemm_plan``, ``grouped``); DeepSeek-V3's ``wkv_a`` (7168 -> 512 + 64
= 576) is such a case.

The weight-gradient GEMM runs in BF16 by default (``wgrad="bf16"``: faster than cuBLAS's FP8 Wgrad on an
H200, see ``fp8.linear``), or in FP8 as DeepSeek-V3 does (``wgrad="fp8"``, config ``fp8.wgrad``).

Weights are quantized once per optimizer step and cached; call ``invalidate_weight_caches(model)`` after
every optimizer step (and after loading a checkpoint) whenever the optimizer writes parameters in place
without bumping their autograd version, as ZeRO-1's in-place all-gather does.
"""

import logging
from dataclasses import dataclass, field

from torch import nn

from haillm.fp8.gemm import blockwise_fp8_available, device_capability
from haillm.models.deepseek_v3.experts import WEIGHTS, GroupedExperts
from haillm.ops.linear import Linear

logger = logging.getLogger(__name__)

FP8_LINEARS = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3", "eh_proj"})
BLOCK = 128

# ModelArgs overrides (on the ``tiny`` preset) for a CPU-sized MoE model in which the FP8 policy applies:
# every eligible linear has 128-multiple features except wkv_a (128 + 32 = 160), whose partial blocks stand
# for DeepSeek-V3's own wkv_a (576). ~5M parameters; used by the FP8 tests and bench/fp8_fidelity.py.
FP8_TINY_OVERRIDES = dict(
    dim=256,
    inter_dim=512,
    moe_inter_dim=128,
    n_heads=4,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
)


@dataclass
class PrecisionReport:
    """What ``apply_precision`` did: FQNs of the linears in low precision and of those kept in high precision
    by the policy; ``shapes``: every reported linear's weight shape ``[out, in]`` (routed experts are reported
    one by one, ``<experts>.<gid>.<w>``)."""

    precision: str
    low: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        if self.precision == "default":
            return f"linears: all {len(self.kept)} in default precision"
        return (
            f"linears: {len(self.low)} {self.precision}, {len(self.kept)} high precision by policy "
            f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in self.kept})) or 'none'})"
        )


def apply_precision(
    model: nn.Module, precision: str, pow2_scales: bool = False, wgrad: str = "bf16", cache_transposed: bool = False
) -> PrecisionReport:
    """Set ``precision`` ("fp8", "bf16_emulated" or "default") on the policy's linears of ``model`` and
    "default" on all others; ``pow2_scales``, ``wgrad`` and ``cache_transposed`` are the FP8 options of
    ``Linear.set_precision``.
    "bf16_emulated" covers exactly the linears FP8 would, so an FP8-vs-BF16 comparison differs in those GEMMs
    only. Idempotent; call once the model is built (before or after the optimizer: parameters are not
    touched)."""
    report = PrecisionReport(precision)
    for fqn, module in model.named_modules():
        if isinstance(module, Linear):
            linears = [(fqn, [module.out_features, module.in_features])]
        elif isinstance(module, GroupedExperts):  # reported as its experts' linears, by global id
            linears = [(f"{fqn}.{gid}.{w}", list(getattr(module, w).shape[1:])) for gid in module.ids for w in WEIGHTS]
        else:
            continue
        low = precision != "default" and all(n.rsplit(".", 1)[-1] in FP8_LINEARS for n, _ in linears)
        module.set_precision(precision if low else "default", pow2_scales, wgrad, cache_transposed)
        for name, shape in linears:
            report.shapes[name] = shape
            (report.low if low else report.kept).append(name)
    return report


def apply_fp8(model: nn.Module, enabled: bool, pow2_scales: bool = False, wgrad: str = "bf16",
              cache_transposed: bool = False) -> PrecisionReport:
    """Turn DeepSeek-V3's FP8 policy on (or everything back to default precision when not ``enabled``). On a
    GPU without blockwise FP8 GEMMs (not SM90) every linear stays in default precision, said in one warning:
    the CPU reference GEMM never runs on a GPU."""
    device = next(model.parameters()).device
    if enabled and not blockwise_fp8_available(device_capability(device)):
        logger.warning(f"fp8.enabled=true: blockwise FP8 GEMMs need an SM90 (Hopper) GPU; {device} runs every "
                       "linear in its default precision")
        enabled = False
    return apply_precision(model, "fp8" if enabled else "default", pow2_scales, wgrad, cache_transposed)


def invalidate_weight_caches(model: nn.Module) -> None:
    """Drop every cached FP8 weight of ``model`` so the next forward requantizes: call after each optimizer
    step and checkpoint load (required with ZeRO-1; harmless and cheap otherwise)."""
    for module in model.modules():
        if isinstance(module, (Linear, GroupedExperts)):
            module.invalidate_fp8_weight()
