"""Hugging Face DeepseekV3 checkpoints in and out (config.json + safetensors shards).

A Hugging Face checkpoint names every tensor after transformers' modules (``model.layers.{i}.self_attn.
kv_a_proj_with_mqa.weight``); ours follow DeepSeek's reference names (``layers.{i}.attn.wkv_a.weight``). The
mapping is one to one except for the MTP modules: module k is stored as decoder layer ``n_layers + k``
with its own ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` and copies of the embedding and output
head, which we share with the main model (so the copies are skipped on load and written on save).

Released FP8 checkpoints store a weight as ``float8_e4m3fn`` with a float32 sibling ``<name>_scale_inv``
holding one factor per 128x128 block; such weights are dequantized to fp32 on load. Experts are read both in
the released per-expert layout and in the fused ``mlp.experts.{gate_up_proj,down_proj}`` layout of
transformers' in-memory modules; they are written per expert, the layout transformers itself saves and loads.
"""

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from haillm.models.deepseek_v3.args import ModelArgs
from haillm.models.deepseek_v3.hf_config import CHECKPOINT_FIELDS, args_from_hf_config, hf_config_from_args
from haillm.models.deepseek_v3.model import DeepSeekV3

logger = logging.getLogger(__name__)

# Names inside one decoder layer, Hugging Face -> ours (main layers and MTP blocks alike).
_LAYER_TO_OURS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
}
_LAYER_TO_HF = {ours: hf for hf, ours in _LAYER_TO_OURS.items()}
# SwiGLU projections of the dense FFN, of each routed expert and of the shared experts.
_PROJ_TO_OURS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_PROJ_TO_HF = {ours: hf for hf, ours in _PROJ_TO_OURS.items()}
_HF_FFN = re.compile(r"mlp\.((?:shared_experts\.|experts\.\d+\.)?)(gate_proj|up_proj|down_proj)\.weight")
_OUR_FFN = re.compile(r"ffn\.((?:shared_experts\.|experts\.\d+\.)?)(w1|w2|w3)\.weight")
# MTP-only names inside layer n_layers + k, Hugging Face -> ours under ``mtp.{k}.``.
_MTP_TO_OURS = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "norm.weight",
}
_MTP_TO_HF = {ours: hf for hf, ours in _MTP_TO_OURS.items()}
_MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_TOP_TO_OURS = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "head.weight"}
_TOP_TO_HF = {ours: hf for hf, ours in _TOP_TO_OURS.items()}
_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# Per direction (True: Hugging Face -> ours): exact names, FFN pattern, projection names, FFN prefix.
_IN_LAYER = {True: (_LAYER_TO_OURS, _HF_FFN, _PROJ_TO_OURS, "ffn"),
             False: (_LAYER_TO_HF, _OUR_FFN, _PROJ_TO_HF, "mlp")}


def _rename_in_layer(name: str, to_ours: bool) -> str:
    """A decoder-layer tensor name in the other convention."""
    names, ffn_pattern, projections, ffn_prefix = _IN_LAYER[to_ours]
    if name in names:
        return names[name]
    m = ffn_pattern.fullmatch(name)
    if m is None:
        raise ValueError(f"unknown decoder-layer tensor {name!r} (no {'our' if to_ours else 'HF'} name)")
    return f"{ffn_prefix}.{m[1]}{projections[m[2]]}.weight"


def hf_name_to_ours(name: str, n_layers: int) -> str | None:
    """Our FQN for a Hugging Face tensor name, or None for an MTP copy of the shared embedding/head."""
    if name in _TOP_TO_OURS:
        return _TOP_TO_OURS[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"unknown tensor in a DeepseekV3 checkpoint: {name!r}")
    layer, rest = int(m[1]), m[2]
    if layer < n_layers:
        return f"layers.{layer}.{_rename_in_layer(rest, to_ours=True)}"
    k = layer - n_layers
    if rest in _MTP_SHARED_COPIES:
        return None
    if rest in _MTP_TO_OURS:
        return f"mtp.{k}.{_MTP_TO_OURS[rest]}"
    return f"mtp.{k}.block.{_rename_in_layer(rest, to_ours=True)}"


def our_name_to_hf(name: str, n_layers: int) -> str:
    """The Hugging Face tensor name of one of our FQNs (inverse of ``hf_name_to_ours``)."""
    if name in _TOP_TO_HF:
        return _TOP_TO_HF[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is not None:
        return f"model.layers.{m[1]}.{_rename_in_layer(m[2], to_ours=False)}"
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"no Hugging Face name for our tensor {name!r}")
    prefix, rest = f"model.layers.{n_layers + int(m[1])}", m[2]
    if rest in _MTP_TO_HF:
        return f"{prefix}.{_MTP_TO_HF[rest]}"
    if not rest.startswith("block."):
        raise ValueError(f"no Hugging Face name for our tensor {name!r}")
    return f"{prefix}.{_rename_in_layer(rest.removeprefix('block.'), to_ours=False)}"


# ---------------------------------------------------------------------------------------------- reading


def dequant_blockwise(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 ``w * scale_inv`` with one factor per ``block`` of the 2-D ``w`` (partial edge blocks allowed)."""
    rows, cols = w.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} for a {rows}x{cols} weight in "
                         f"{block[0]}x{block[1]} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * scale


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def _split_fused_experts(name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' fused expert tensors: gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]."""
    m = _FUSED_EXPERTS.fullmatch(name)
    for e, w in enumerate(t):
        if m[2] == "down_proj":
            yield f"{m[1]}.{e}.down_proj.weight", w
        else:
            gate, up = w.chunk(2, dim=0)
            yield f"{m[1]}.{e}.gate_proj.weight", gate
            yield f"{m[1]}.{e}.up_proj.weight", up


def read_hf_tensors(path: str | Path, keep: Callable[[str], bool] = lambda name: True
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for the weights of a checkpoint whose name ``keep`` accepts, FP8
    dequantized, experts per expert. Tensors not kept are not read (a pipeline stage reads its own)."""
    path = Path(path)
    quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    with ExitStack() as stack:
        where = {}
        for file in _checkpoint_files(path):
            handle = stack.enter_context(safe_open(file, framework="pt"))
            where.update(dict.fromkeys(handle.keys(), handle))
        for name, handle in where.items():
            fused = _FUSED_EXPERTS.fullmatch(name)
            if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in where:
                continue
            if not fused and not keep(name):
                continue
            t = handle.get_tensor(name)
            if name + "_scale_inv" in where:
                t = dequant_blockwise(t, where[name + "_scale_inv"].get_tensor(name + "_scale_inv"), block)
            elif t.dtype in _FP8_DTYPES:
                raise ValueError(f"{name} is {t.dtype} but the checkpoint has no {name}_scale_inv")
            if fused:
                yield from ((n, w) for n, w in _split_fused_experts(name, t) if keep(n))
            else:
                yield name, t


def _checkpoint_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    names = []
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt") as handle:
            names.extend(handle.keys())
    return names


def _mtp_modules_stored(path: Path, n_layers: int) -> int:
    stored = (re.match(r"model\.layers\.(\d+)\.", name) for name in _checkpoint_names(path))
    layers = {int(m[1]) for m in stored if m}
    depth = 0
    while n_layers + depth in layers:
        depth += 1
    return depth


def hf_model_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of a Hugging Face DeepseekV3 checkpoint directory: its config.json, with ``mtp_depth`` the
    number of MTP layers actually stored (transformers' ``save_pretrained`` keeps ``num_nextn_predict_layers``
    in the config but writes no MTP weights). ValueError or OSError for a config or directory we cannot use."""
    path = Path(path)
    args = args_from_hf_config(json.loads((path / "config.json").read_text()))
    return args.replace(mtp_depth=min(args.mtp_depth, _mtp_modules_stored(path, args.n_layers)))


def load_hf_state(model: DeepSeekV3, path: str | Path, allow_missing_mtp: bool = False) -> None:
    """Copy a Hugging Face checkpoint's weights into an existing model (in place), e.g. for
    ``model.init_from=hf:<path>``; the checkpoint's config must agree on ``CHECKPOINT_FIELDS``.

    The model may hold part of the full model under its full-model names (a pipeline stage, the local
    experts of expert parallelism, fewer MTP modules): checkpoint tensors it does not hold are skipped. Every
    tensor it holds must be in the checkpoint, except that MTP modules the checkpoint lacks (transformers'
    own ``save_pretrained`` writes none) keep their current values when ``allow_missing_mtp``.
    """
    stored = args_from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    differ = [f"{f}={getattr(stored, f)!r} (model: {getattr(model.args, f)!r})"
              for f in CHECKPOINT_FIELDS if getattr(stored, f) != getattr(model.args, f)]
    if differ:
        raise ValueError(f"checkpoint {path} does not fit the model: {', '.join(differ)}")
    n_layers = model.args.n_layers
    targets = model.state_dict()
    missing = set(targets)
    with torch.no_grad():
        for hf_name, t in read_hf_tensors(path, keep=lambda name: hf_name_to_ours(name, n_layers) in targets):
            ours = hf_name_to_ours(hf_name, n_layers)
            if targets[ours].shape != t.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(t.shape)} != model shape "
                                 f"{tuple(targets[ours].shape)} ({ours})")
            targets[ours].copy_(t)
            missing.discard(ours)
    if missing and not (allow_missing_mtp and all(name.startswith("mtp.") for name in missing)):
        raise ValueError(f"{len(missing)} model tensors not in checkpoint {path}: {sorted(missing)[:8]}")
    if missing:
        logger.warning("no MTP weights in %s: %d MTP tensors keep their values", path, len(missing))


def load_hf(path: str | Path) -> DeepSeekV3:
    """Build our model from a Hugging Face DeepseekV3 checkpoint directory (config.json + safetensors).

    ``mtp_depth`` is the number of MTP layers actually stored: transformers' ``save_pretrained`` keeps
    ``num_nextn_predict_layers`` in the config but writes no MTP weights.
    """
    model = DeepSeekV3(hf_model_args(path))
    load_hf_state(model, path)
    return model


# ---------------------------------------------------------------------------------------------- writing


def save_hf(model: DeepSeekV3, path: str | Path, max_shard_bytes: int = 4 << 30, eos_token_id: int | None = None
            ) -> None:
    """Write a full ``model`` (not a pipeline stage or expert shard) as a Hugging Face DeepseekV3 checkpoint:
    config.json, safetensors shards (in the model's dtype, gate bias fp32) and model.safetensors.index.json
    when there is more than one shard; ``eos_token_id``: see ``hf_config_from_args``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = model.args
    state = model.state_dict()
    tensors = {our_name_to_hf(name, args.n_layers): t for name, t in state.items()}
    for k in range(args.mtp_depth):
        for hf_suffix, ours in _MTP_SHARED_COPIES.items():
            tensors[f"model.layers.{args.n_layers + k}.{hf_suffix}"] = state[ours]

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        # Own contiguous copies: safetensors refuses tensors that share storage (the MTP copies do).
        shard = {name: tensors[name].detach().to("cpu").contiguous().clone() for name in names}
        save_file(shard, path / file, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_from_args(args, state["embed.weight"].dtype, eos_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
