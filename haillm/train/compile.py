"""Regional ``torch.compile`` of the transformer blocks (``train.compile=true``).

Our step is launch-bound on a GPU (many small kernels per block), so each block's pieces are compiled,
torchtitan style: per block, not the whole model. What stays eager is what a compiled graph cannot hold:

- the MoE token movement (sort, dispatch, combine) and the routed experts: under expert parallelism the
  dispatch is an all-to-all whose split sizes are read on the host and the rows each rank receives change
  every step; the grouped-GEMM op picks its kernel from pointers and may read group bounds on the host;
- the pipeline's split-phase forward (``forward_phases`` generators, graph cuts): it lives in
  ``Block.forward_phases`` and ``MoE.forward_phases``, between the compiled pieces;
- linears that do not run plain ``F.linear`` (FP8, bf16-emulated, deferred weight gradients) run eagerly
  at a graph break (``_plain_linears_only``). Traced, a deferrable linear's backward is fixed when the
  forward is traced, outside any I action, so an I action would compute its weight gradient at once
  instead of queueing it; the FP8 weight cache's version check becomes a guard, so every optimizer step
  recompiles (until dynamo's recompile limit turns the region eager); so do the ops that quantize for them
  (``haillm.fp8.fused``);
- under context parallelism, the latents' all-gather and the blockwise attention to the gathered chunks
  (``ContextParallel.start_gather``, ``MLA._attend_gathered``): a collective with its wait, and autograd
  nodes that share Python state; the MLA region's graph breaks around them;
- the embedding, the head with its fused cross-entropy, the MTP projections: outside the blocks.

The compiled regions are a block's ``attn_norm``, ``attn`` (MLA), ``ffn_norm`` and its FFN: the dense
MLP, or in an MoE layer the router (``gate``) and the shared experts. Each region's ``forward`` is
replaced by its compiled version, so the module's own hooks still run eagerly around it (the ZeRO-1
parameter wait is registered per region, ``ZeroAdamW.register_forward_wait(regions=...)``) and parameter
names are unchanged. Regions of the same kind share compiled code across layers; every shape they see is
fixed by ``train.micro_batch_size`` and ``train.seq_len`` (the MTP blocks see ``seq_len - 1``), so shapes
are static (``dynamic=False``) and nothing recompiles after the first step (evaluation under ``no_grad``
compiles its own variant once; ``forward_inference`` with its varying lengths is not meant to be compiled).

Activation recomputation composes: a region's input that recomputation marked (an RMSNorm output from
another region) is saved as a recipe as before; inside a region the MLA up-projections are recomputed
through ``torch.utils.checkpoint`` (``haillm.ops.recompute``), and the other choices of what backward keeps
are the partitioner's (it recomputes norms and pointwise ops itself).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from haillm.fp8.quant import Fp8Pair
from haillm.models.deepseek_v3 import mla
from haillm.models.deepseek_v3.model import Block
from haillm.models.deepseek_v3.moe import MoE
from haillm.ops import Linear
from haillm.ops.graph_breaks import apply_graph_breaks

_REGION = "_haillm_compiled_region"


def block_regions(block: Block) -> list[nn.Module]:
    """The sub-modules of ``block`` that are compiled (see the module docstring)."""
    regions = [block.attn_norm, block.attn, block.ffn_norm]
    if isinstance(block.ffn, MoE):
        regions.append(block.ffn.gate)
        if block.ffn.shared_experts is not None:
            regions.append(block.ffn.shared_experts)
    else:
        regions.append(block.ffn)
    return regions


def apply_compile(model: nn.Module, backend: str | Callable = "inductor") -> list[nn.Module]:
    """Compile the regions of every transformer block of ``model`` (a ``DeepSeekV3`` or a pipeline
    ``StageModel``; MTP blocks included) in place; returns the regions. Call it after expert parallelism
    is applied and before the optimizer registers its hooks. ``backend``: any ``torch.compile`` backend."""
    regions = [r for block in model.modules() if isinstance(block, Block) for r in block_regions(block)]
    for region in regions:
        compile_region(region, backend)
    return regions


def compile_region(module: nn.Module, backend: str | Callable = "inductor") -> None:
    """Replace ``module.forward`` by its compiled version (static shapes, graph breaks allowed), its
    linears traced only on their plain path (``_plain_linears_only``)."""
    if getattr(module, _REGION, False):
        raise RuntimeError(f"{type(module).__name__} is compiled already")
    _prepare_dynamo()
    for linear in (m for m in module.modules() if isinstance(m, Linear)):
        _plain_linears_only(linear)
    module.forward = torch.compile(module.forward, backend=backend, dynamic=False, fullgraph=False)
    setattr(module, _REGION, True)


def compiled_regions(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``model`` whose forward ``apply_compile`` compiled."""
    return (m for m in model.modules() if getattr(m, _REGION, False))


def _plain_linears_only(linear: Linear) -> None:
    """Let a compiled region trace ``linear`` only on its plain path; any other path runs eagerly (a graph
    break). Checked per call, so a precision set after compilation (``apply_fp8``) is honoured too."""
    traced = linear.forward
    eager = torch.compiler.disable(linear.forward)

    def forward(x: torch.Tensor, x_fp8: Fp8Pair | None = None) -> torch.Tensor:
        if linear.precision == "default" and not linear.defer_wgrad:
            return traced(x)  # the plain path has no use for a producer's FP8 copy
        return eager(x, x_fp8)

    # A region traces this wrapper inline. Where it takes the eager path, the region's graph breaks and the
    # call runs as a frame of its own, which dynamo would compile (an empty graph around the eager call) once
    # per input shape, up to its recompile limit: nothing to compile there, so the frame runs as Python.
    torch._dynamo.eval_frame.skip_code(forward.__code__)
    linear.forward = forward


@functools.cache
def _prepare_dynamo() -> None:
    """What compiled regions need of dynamo, set up by the first of them (importing dynamo costs every process
    ~1.5 s of start-up, so nothing imports it before a run compiles): the marked functions become graph breaks
    (``haillm.ops.graph_breaks``) and ``mla.apply_rope`` is traced as ``_apply_rope``."""
    apply_graph_breaks()
    torch.compiler.substitute_in_graph(mla.apply_rope)(_apply_rope)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``mla.apply_rope`` as compiled code runs it: the same rotation of adjacent pairs in real arithmetic.
    The eager version's complex product needs a layout test (``storage_offset``, which dynamo cannot trace:
    a graph break in every MLA) and complex ops, which inductor does not generate code for."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)
