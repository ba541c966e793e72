"""The configuration reference (docs/configuration.md), generated from the structured config.

    python -m haillm.tools.config_reference > docs/configuration.md      # regenerate
    python -m haillm.tools.config_reference --check docs/configuration.md  # exit 1 if stale or incomplete

Keys, types and defaults come from the dataclasses of ``haillm/config.py`` (defaults as ``conf/config.yaml``
composes them, model fields per preset); each key's meaning is its field's inline ``# comment`` in the
source or, where the source has none, an entry of ``MEANINGS``. A key with neither is an error: the test
suite runs ``--check``, so a new config key cannot land undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from haillm.config import CONF_DIR, Config, compose_config
from haillm.models.deepseek_v3.args import PRESETS

MEANINGS = {
    # model (ModelArgs: DeepSeek's inference/model.py names)
    "model.name": "preset the model fields came from (`model=<preset>`)",
    "model.init_from": "`hf:<directory>`: start from a Hugging Face DeepseekV3 checkpoint instead of random weights; "
                       "the architecture comes from its config.json, not the preset (the MTP depth: the MTP layers "
                       "it stores); a `model.<field>=` override keeps its value (context length, YaRN and MTP depth "
                       "may differ) but must agree with config.json on a field the weights fix",
    "model.vocab_size": "vocabulary size (embedding rows, head outputs); 0: the number of ids of `data.tokenizer` "
                        "(258 for `byte`). Resolved when the config is composed (config.yaml records the number); "
                        "smaller than the tokenizer's is refused, larger is kept",
    "model.dim": "hidden size",
    "model.inter_dim": "intermediate size of the dense FFN layers",
    "model.moe_inter_dim": "intermediate size of each routed and shared expert",
    "model.n_layers": "transformer blocks of the main model",
    "model.n_dense_layers": "leading blocks with a dense FFN; the rest are MoE",
    "model.n_heads": "attention heads",
    "model.n_routed_experts": "routed experts per MoE layer",
    "model.n_shared_experts": "shared experts per MoE layer (one MLP of n x moe_inter_dim)",
    "model.n_activated_experts": "routed experts per token (top-k)",
    "model.n_expert_groups": "expert groups for group-limited routing (one per node under EP)",
    "model.n_limited_groups": "groups a token may be routed to",
    "model.score_func": "router affinity: `sigmoid` (V3) or `softmax` (V2)",
    "model.route_scale": "factor on the routing weights",
    "model.norm_topk_prob": "renormalise the top-k weights to sum 1",
    "model.q_lora_rank": "query compression rank (0: no compression)",
    "model.kv_lora_rank": "key/value latent rank",
    "model.qk_nope_head_dim": "per-head query/key dims without RoPE",
    "model.qk_rope_head_dim": "per-head query/key dims with RoPE (the shared rotary key)",
    "model.v_head_dim": "per-head value dims",
    "model.max_seq_len": "longest sequence; above original_seq_len YaRN is on",
    "model.original_seq_len": "pre-training context length (YaRN's reference)",
    "model.rope_theta": "RoPE base",
    "model.rope_factor": "YaRN scaling factor",
    "model.beta_fast": "YaRN correction range, fast end",
    "model.beta_slow": "YaRN correction range, slow end",
    "model.mscale": "YaRN rotary attention factor (Hugging Face meaning)",
    "model.mscale_all_dim": "YaRN softmax-scale factor (Hugging Face meaning)",
    "model.mtp_depth": "multi-token prediction modules (0: none)",
    "model.mtp_lambda": "weight of the MTP loss",
    "model.balance_alpha": "weight of the sequence-wise balance loss (0: off)",
    "model.bias_update_speed": "step of the auxiliary-loss-free routing bias per optimizer step (gamma)",
    "model.rms_norm_eps": "RMSNorm epsilon",
    "model.init_std": "standard deviation of the initial weights",
    # parallel
    "parallel.dp": "data-parallel ranks (ZeRO-1 shards the optimizer state over them)",
    "parallel.pp": "pipeline ranks",
    "parallel.cp": "context-parallel ranks: each sequence cut into 2*cp chunks, rank r holding chunks r and 2cp-1-r; "
                   "MLA exchanges its compressed latents (docs/context_parallel.md)",
    "parallel.tp": "tensor-parallel ranks (MLA heads, FFN widths, vocabulary split; on one node; docs/layout.md)",
    "parallel.ep": "expert-parallel ranks inside each data-parallel group (divides dp)",
    "parallel.pp_schedule": "`1f1b`, `dualpipe` (pp even; two stages per rank, mirrored) or `dualpipev`",
    "parallel.ranks_per_node": "GPUs per node, for node-limited routing and EP placement",
    # train
    "train.steps": "optimizer steps to train to",
    "train.seq_len": "tokens per training sequence (at most model.max_seq_len)",
    "train.lr": "peak learning rate",
    "train.deterministic": "deterministic kernels (exact resume and layout parity in fp32)",
    "train.compile": "`torch.compile` each transformer block's pieces (norms, attention, dense FFN, router, shared "
                     "experts; `haillm/train/compile.py`); token exchange, routed experts and FP8 or deferred "
                     "linears stay eager. The first step includes the compilation",
    "train.recompute": "keep no RMSNorm outputs (nor their FP8 copies), no MLA q/k/v and no second copy of the "
                       "attention output (`wo`'s input) for backward: recomputed there; gradients bitwise unchanged "
                       "(DeepSeek-V3 §3.2.3)",
    "train.recompute_swiglu": "the FFNs keep only their SwiGLU inputs (FP8 under `fp8=enabled`) and recompute its "
                              "output in backward; MoE layers apply each routed copy's gate weight before `w2` (sent "
                              "with the token under expert parallelism) so the combine keeps nothing (DeepSeek-V3 "
                              "§3.3.2). Equal in exact arithmetic, not bitwise (tests/test_moe_memory.py states the "
                              "bounds). `null`: as `train.recompute`",
    "fp8.cache_transposed": "keep the transposed FP8 copy of every FP8 weight, which Dgrad reads, from one "
                            "optimizer step to the next (one more FP8 copy of the FP8 weights: 3 GiB per GPU at "
                            "DeepSeek-V3's layout) instead of transposing one weight at a time in backward; "
                            "numbers are the same either way",
    "train.ema_decay": "decay of an exponential moving average of the parameters (DeepSeek-V3): "
                       "`ema = decay * ema + (1 - decay) * param` after each applied optimizer step, kept in fp32 "
                       "host memory and blended in a background thread (`haillm/train/ema.py`); saved in checkpoints "
                       "as `ema.<name>` and resumed exactly; `python -m haillm.tools.export --ema` exports it. "
                       "0 = off; must be in [0, 1)",
    # data
    "data.source": "`stdlib` (the Python standard library's source), a file or directory of corpus files (.txt "
                   ".text .md .rst .jsonl .json .parquet; text and json also as .gz .bz2 .xz .zst; a directory "
                   "holding any other file is refused, naming it; hidden files are skipped), a preprocessed "
                   "directory, or `hf:<name>[:<config>]` when online",
    "data.text_field": "JSON / parquet column holding the text",
    "data.split": "split of an `hf:` dataset",
    "data.shuffle": "shuffle the packed sequences (seeded; resumable)",
    "data.blend": "weighted blend of preprocessed directories, `WEIGHT:DIR` each "
    "(`data.blend=[0.7:/d/web,0.3:/d/code]`); when given, the training data instead of `data.source`; "
    "weights are relative",
    # optim
    "optim.beta1": "AdamW beta1",
    "optim.beta2": "AdamW beta2",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "decoupled weight decay (not on norms, biases, the gate bias)",
    "optim.schedule": "`cosine`, `constant_then_decay` (DeepSeek-V3's shape) or `constant`",
    "optim.warmup_steps": "linear warm-up steps",
    "fp8.enabled": "fine-grained FP8 GEMMs (1x128 activation tiles, 128x128 weight blocks); docs/fp8.md",
    "fp8.pow2_scales": "round FP8 scales up to powers of two",
    "fp8.wgrad": "weight-gradient GEMM: bf16 (faster with cuBLAS on an H200) or fp8 (DeepSeek-V3's recipe)",
    "logging.wandb": "Weights & Biases: `disabled`, `offline` or `online`",
    "logging.wandb_project": "Weights & Biases project",
    "logging.run_name": "Weights & Biases run name (default: the run directory's name)",
    "logging.tensorboard": "TensorBoard event files under output_dir/tensorboard (`tensorboard --logdir runs/`)",
    "seed": "seed of the weights (per parameter name) and of the data order",
    "output_dir": "run directory: config.yaml, metrics.jsonl, train.log, checkpoints/",
}
GROUPS = ("model", "parallel", "data", "optim", "fp8", "logging")


def _inline_comments(cls: type) -> dict[str, str]:
    """``name: type = value  # comment`` -> {name: comment} for one dataclass's own source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, line_name = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[0] not in line_name and tok.line.lstrip().startswith(tok.string):
            line_name[tok.start[0]] = tok.string
        if tok.type == tokenize.COMMENT and tok.start[0] in line_name and tok.line.split("#")[0].strip():
            out[line_name[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return out


@cache
def _comments(cls: type) -> dict[str, str]:
    merged: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        merged.update(_inline_comments(base))
    return merged


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, type name, inline comment or "") for every key of ``Config``, in declaration order."""
    keys = []
    for f in dataclasses.fields(Config):
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            notes = _comments(type(section))
            for sub in dataclasses.fields(section):
                keys.append((f"{f.name}.{sub.name}", _type_name(sub.type), notes.get(sub.name, "")))
        else:
            keys.append((f.name, _type_name(f.type), _comments(Config).get(f.name, "")))
    return keys


def _type_name(t: object) -> str:
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return name.replace(" | None", " or null")  # (a table cell: no pipe)


def meaning(key: str, comment: str) -> str:
    return MEANINGS.get(key) or comment


def undocumented() -> list[str]:
    return [key for key, _, comment in config_keys() if not meaning(key, comment)]


def stale_meanings() -> list[str]:
    known = {key for key, _, _ in config_keys()}
    return sorted(set(MEANINGS) - known)


def _value(v: object) -> str:
    """As it is written in an override: `sigmoid`, `true`, `''`."""
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if v is None:
        return "`null`"
    return f"`{v}`" if v != "" else "`''`"


def preset_values(name: str) -> dict:
    """The model fields of preset `name` as `model=<name>` composes them before resolution: the Python preset's,
    with those its conf/model/<name>.yaml sets (`vocab_size: 0` for `tiny` and `small`)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    own = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    return {**dataclasses.asdict(PRESETS[name]), **{k: v for k, v in own.items() if k != "defaults"}}


def render() -> str:
    defaults = OmegaConf.to_container(compose_config([]), resolve=False)
    presets = list(PRESETS)
    values_of = {p: preset_values(p) for p in presets}
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m haillm.tools.config_reference` from `haillm/config.py` (do not edit by hand;",
        "the test suite fails when this file is stale or a key has no description). Every key is an override",
        "of `launch/train.py` (and of `python -m haillm.tools.plan`): `train.steps=50`, `model=small`,",
        "`parallel.pp=2`. Defaults are what `conf/config.yaml` composes with no overrides.",
        "",
        "## Groups",
        "",
        "| group | entries |",
        "|---|---|",
    ]
    for group in GROUPS:
        entries = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        out.append(f"| `{group}=` | {', '.join(f'`{e}`' for e in entries)} |")
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for key, type_name, comment in config_keys():
        sections.setdefault(key.split(".")[0] if "." in key else "top-level", []).append((key, type_name, comment))
    for section, rows in sections.items():
        out += ["", f"## {section}", ""]
        if section == "model":
            out += ["| key | type | " + " | ".join(f"`{p}`" for p in presets) + " | meaning |",
                    "|---" * (len(presets) + 3) + "|"]
            for key, type_name, comment in rows:
                field = key.split(".", 1)[1]
                values = [_value(values_of[p][field]) if field in values_of[p] else "" for p in presets]
                out.append(f"| `{key}` | {type_name} | " + " | ".join(values) + f" | {meaning(key, comment)} |")
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_name, comment in rows:
            node = defaults
            for part in key.split("."):
                node = node[part]
            out.append(f"| `{key}` | {type_name} | {_value(node)} | {meaning(key, comment)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haillm.tools.config_reference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE is not the current reference")
    args = parser.parse_args(argv)
    missing, stale = undocumented(), stale_meanings()
    if missing or stale:
        print(f"config keys without a description: {missing}; descriptions of no key: {stale}", file=sys.stderr)
        return 1
    text = render()
    if args.check:
        if Path(args.check).read_text() != text:
            print(f"{args.check} is stale: python -m haillm.tools.config_reference > {args.check}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
