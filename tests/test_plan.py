"""The layout planner (`python -m haillm.tools.plan`) against DeepSeek-V3's published figures
(shared/REFERENCE.md §5: ISCA'25 Table 2 and 4, the V3 report's cost table), its output contract and bad input.
Memory against measured runs is tests/test_plan_memory.py."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from haillm.config import compose_config, validate
from haillm.fp8.policy import FP8_TINY_OVERRIDES
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.flops import count_params, flops_per_token
from haillm.parallel.pipeline.stage import StageSpec
from haillm.tools.activations import ActivationSetup, attention_per_token, ffn_per_token, head_bytes
from haillm.tools.memory import Layout
from haillm.tools.plan import GIB, main, make_plan
from haillm.tools.plan_time import Bandwidths, tp_traffic
from haillm.train.metrics import peak_flops

PUBLISHED = ["model=v3_671b", "parallel.pp=16", "parallel.ep=64", "parallel.dp=128", "parallel.pp_schedule=dualpipe",
             "train.global_batch_size=15360", "train.seq_len=4096"]
TINY = ["model=tiny", "train.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def published() -> dict:
    """What `python -m haillm.tools.plan <published layout> --gpus 2048 --gpu h800 --step-time 19.926 --json`
    prints (the CLI itself is exercised on tiny below: the 671B plan takes ~10 s)."""
    return make_plan(PUBLISHED, gpus=2048, gpu="h800", step_time=19.926)


def test_published_parameters_and_flops(published):
    plan = published
    # 671B total (main model; the MTP module adds 11.6B on top, as in the released 685B checkpoint)
    assert round(plan["total_params"] / 1e9) == 671
    # "37B activated": our count is 36.63B without the embedding table (a token reads one row of it),
    # which rounds to 37B; counting the table gives 37.55B. Within 1.1% of 37B either way.
    assert round(plan["active_params"] / 1e9) == 37
    assert abs(plan["active_params_with_embedding"] / 37e9 - 1) < 0.02
    # ISCA'25 Table 2: 250 GFLOPs per training token; ours 260.6 with MTP (250.4 without), causal attention
    assert plan["flops_per_token"] == pytest.approx(250e9, rel=0.10)
    assert plan["flops_per_token_without_mtp"] == pytest.approx(250e9, rel=0.01)
    assert plan["flops_per_token"] == flops_per_token(get_preset("v3_671b"), 4096)  # the trainer's own formula
    assert (plan["total_params"], plan["active_params"]) == count_params(get_preset("v3_671b"))


def test_published_mfu_and_gpu_hours(published):
    plan = published
    # ISCA'25 Table 4: 19.926 s per step, MFU 38.94% (causal) to 43.73% (non-causal) of the BF16 peak
    assert 0.389 * 0.9 <= plan["mfu"] <= 0.4373 * 1.1
    assert 0.389 <= plan["mfu"] <= 0.4373  # ours (causal, MTP counted): 40.6%, inside the published range
    # V3 report: 180K H800 GPU-hours per trillion tokens
    assert plan["gpu_hours_per_trillion_tokens"] == pytest.approx(180e3, rel=0.15)
    assert plan["tokens_per_step"] == 15360 * 4096
    assert plan["peak_flops_per_gpu"] == 989e12


def test_published_layout_memory_and_traffic(published):
    plan = published
    mem = plan["memory_bytes_per_rank"]
    assert {"parameters", "gradients", "optimizer", "activations", "total", "fits"} <= mem.keys()
    lay = plan["layout"]
    assert (lay["micro_batch_size"], lay["microbatches_per_step"], lay["param_dtype"]) == (1, 120, "bf16")
    ranks = plan["memory_bytes_per_pp_rank"]
    assert len(ranks) == 16 and mem["total"] == max(r["total"] for r in ranks)
    # DualPipe: rank r and its mirror 15-r hold the same two stages, hence the same memory
    assert [r["total"] for r in ranks] == [r["total"] for r in reversed(ranks)]
    # Peak in flight: PP+1 = 17 micro-batches of a middle rank's (equal) stages
    middle = ranks[1]
    assert middle["activations"] == pytest.approx(17 * middle["activations_per_microbatch"][0])
    # bf16 parameters; gradients in fp32 buckets (2x); ~2 x 4 of 61 layers' experts x 4 of 256 per rank
    assert mem["gradients"] == 2 * mem["parameters"]
    assert 5 * GIB < mem["parameters"] < 8 * GIB
    # with recompute and FP8 off (the defaults), our activations keep 3.01 GiB per MoE layer per 4096-token
    # micro-batch, 12.04 GiB per middle stage of 4 layers, 17 of them in flight: this layout does not fit 80 GiB
    assert middle["activations_per_microbatch"] == pytest.approx([4 * 3.01 * GIB] * 2, rel=1e-3)
    assert mem["fits"] is False and mem["capacity"] == 80 * GIB
    comm = plan["comm_bytes_per_rank_per_step"]
    assert comm["all_to_all"] > comm["pipeline_p2p"] > 0
    # each mirror pair all-reduces every fp32 gradient: the gradient buckets less their padding
    for rank, sent in zip(ranks, plan["comm_bytes_per_pp_rank_per_step"], strict=True):
        assert rank["gradients"] - 128 * 4 * rank["buckets"] < sent["partner_all_reduce"] <= rank["gradients"]


def test_deepseek_recipe_fits_the_published_layout():
    """DeepSeek-V3's own settings (bf16 moments, FP8, recompute) on its 2048 x 80 GB layout fit (issue #22):
    a MoE layer keeps at most 180 KB per token and the head at most 32 KB (we keep 165 KB and 14 KB)."""
    plan = make_plan([*PUBLISHED, "optim=v3", "fp8=enabled", "train.recompute=true"], gpus=2048, gpu="h800")
    mem = plan["memory_bytes_per_rank"]
    assert mem["fits"] and mem["total"] < mem["usable"] < mem["capacity"] == 80 * GIB
    a, setup = get_preset("v3_671b"), ActivationSetup(act_bytes=2, recompute=True, fp8=True, ep=64)
    per_layer = attention_per_token(a, setup) + ffn_per_token(a, False, setup)
    assert 150e3 < per_layer <= 180e3
    assert head_bytes(a, setup, 4096) / 4096 <= 32e3
    middle = plan["memory_bytes_per_pp_rank"][1]  # 17 stage-micro-batches of 4 layers x 4096 tokens in flight
    assert middle["activations"] == pytest.approx(17 * 4 * 4096 * per_layer, rel=0.01)


def test_assumed_mfu_gives_the_compute_term():
    """The compute term is the FLOPs at the assumed MFU; the step adds what is not hidden (here ZeRO-1 over dp=2),
    and its MFU is the whole step's, as the trainer logs it. A measured step time gives the MFU instead."""
    plan = make_plan([*TINY, "parallel.dp=2"], gpu="h100", mfu=0.5)
    flops = plan["tokens_per_step"] * plan["flops_per_token"]
    terms = plan["step_time_terms_s"]
    assert terms["compute"] == pytest.approx(flops / (2 * 989e12 * 0.5))
    assert plan["step_time_s"] == pytest.approx(sum(terms.values())) == plan["modelled_step_time_s"]
    assert plan["step_time_s"] > terms["compute"] and terms["zero_reduce_scatter"] > 0
    assert plan["compute_mfu"] == 0.5 and plan["mfu"] == pytest.approx(flops / (plan["step_time_s"] * 2 * 989e12))
    assert plan["memory_bytes_per_rank"]["fits"] is True
    measured = make_plan([*TINY, "parallel.dp=2"], gpu="h100", step_time=plan["step_time_s"])
    assert measured["mfu"] == pytest.approx(plan["mfu"]) and measured["step_time_s"] == plan["step_time_s"]
    assert measured["gpu_hours_per_trillion_tokens"] == pytest.approx(plan["gpu_hours_per_trillion_tokens"])
    # the terms are still modelled (at --mfu's default) next to the measured time
    assert measured["step_time_terms_s"]["compute"] == pytest.approx(flops / (2 * 989e12 * 0.4))


def test_peak_is_the_trainers():
    """The same function as the trainer's MFU: on CPU 50 GFLOP/s per thread of the process, not of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        plan = make_plan(TINY, gpu="cpu")
        assert (plan["peak_flops_per_gpu"], plan["peak_flops_source"]) == peak_flops(torch.device("cpu"))
        assert plan["peak_flops_per_gpu"] == 3 * 50e9
    finally:
        torch.set_num_threads(threads)
    assert make_plan(TINY, gpu="a100")["peak_flops_per_gpu"] == 312e12


def test_bf16_gradient_reduction_halves_the_reduce_scatter():
    fp32 = make_plan([*TINY, "parallel.dp=2"])["comm_bytes_per_rank_per_step"]
    bf16 = make_plan([*TINY, "parallel.dp=2", "optim.grad_reduce_dtype=bf16"])["comm_bytes_per_rank_per_step"]
    assert bf16["zero_reduce_scatter"] == fp32["zero_reduce_scatter"] / 2 > 0
    assert bf16["zero_all_gather"] == fp32["zero_all_gather"]


def test_fp8_linears_only_where_the_runtime_runs_them():
    """apply_fp8 keeps every linear in BF16 on a GPU without blockwise FP8 GEMMs (an A100); the dispatcher
    still sends its payload in FP8 there."""
    fp8_tiny = [*TINY, "parallel.dp=2", "parallel.ep=2", *(f"model.{k}={v}" for k, v in FP8_TINY_OVERRIDES.items())]
    plans = {(gpu, fp8): make_plan([*fp8_tiny, f"fp8.enabled={fp8}"], gpu=gpu)
             for gpu in ("h100", "a100") for fp8 in ("true", "false")}
    mem = {key: plan["memory_bytes_per_rank"] for key, plan in plans.items()}
    assert mem["h100", "true"]["fp8_weight_cache"] > 0
    assert mem["h100", "true"]["activations"] != mem["h100", "false"]["activations"]
    assert mem["a100", "true"]["fp8_weight_cache"] == 0
    assert mem["a100", "true"]["activations"] == mem["a100", "false"]["activations"]
    a2a = {key: plan["comm_bytes_per_rank_per_step"]["all_to_all"] for key, plan in plans.items()}
    assert a2a["a100", "true"] == a2a["h100", "true"] < a2a["a100", "false"]
    assert plans["a100", "true"]["layout"]["fp8_linears"] is False


@pytest.mark.parametrize("mtp_depth", [1, 0])
def test_1f1b_with_mtp_all_reduces_the_embedding_gradient(mtp_depth):
    """sum_partner_grads on the first and the last rank: the fp32 gradient of the embedding both hold,
    reported whichever rank holds the most memory."""
    plan = make_plan([*TINY, "parallel.pp=4", "parallel.pp_schedule=1f1b", f"model.mtp_depth={mtp_depth}"])
    args = get_preset("tiny").replace(vocab_size=compose_config(TINY).model.vocab_size)  # the tokenizer's
    embedding = args.vocab_size * args.dim * 4 if mtp_depth else 0
    assert [r["partner_grads"] for r in plan["memory_bytes_per_pp_rank"]] == [embedding, 0, 0, embedding]
    sent = [c["partner_all_reduce"] for c in plan["comm_bytes_per_pp_rank_per_step"]]
    assert sent == [embedding, 0, 0, embedding]
    assert plan["comm_bytes_per_rank_per_step"]["partner_all_reduce"] == embedding


def _v3_layer_traffic(tp: int, sequence_parallel: bool, fp8: bool = False) -> dict[str, list[float]]:
    """``tp_traffic`` of one dense and one MoE layer of DeepSeek-V3 in BF16, per token of a 4096-token sequence."""
    a, setup = get_preset("v3_671b"), ActivationSetup(act_bytes=2, fp8=fp8, tp=tp, sequence_parallel=sequence_parallel)
    lay = Layout(dp=1, pp=1, ep=1, schedule="1f1b", ranks_per_node=8, micro_batch=1, seq_len=4096, n_microbatches=1,
                 param_dtype=torch.bfloat16, moment_dtype=torch.float32, reduce_dtype=torch.float32, setup=setup, tp=tp,
                 sequence_parallel=sequence_parallel)
    per_layer = tp_traffic(a, lay, StageSpec(0, range(a.n_dense_layers - 1, a.n_dense_layers + 1), False, False))
    return {kind: [b / 4096 for b in both] for kind, both in per_layer.items() if any(both)}


@pytest.mark.parametrize("tp, attention, ffn", [(2, 9280, 14336), (4, 13920, 21504)])
def test_tensor_parallel_traffic_per_layer(tp, attention, ffn):
    """Per token and layer a tp rank sends (tp-1)/tp of what enters and leaves a region under sequence
    parallelism, forward and again backward (docs/tensor_parallel.md: V3's latents in and wo out, an FFN's input in
    and output out). Replicated mode all-reduces instead, twice an all-gather's bytes, once per edge: what leaves
    in forward, what enters in backward; as much in all, plus the MoE router's rows, gathered both ways. FP8
    linears add the gathered FP8 copy of the FFN's input (its data and 1x128 scales) in forward."""
    sp, replicated = _v3_layer_traffic(tp, True), _v3_layer_traffic(tp, False)
    balance = 2 * 256 * 4 / 4096 * 2 * (tp - 1) / tp  # the balance loss's per-sequence sums, all-reduced
    assert sp == {"attention": [2 * attention] * 2, "dense_ffn": [ffn, ffn], "moe": [ffn + balance, ffn]}  # 2 layers
    all_reduce = 2 * (tp - 1) / tp * 2  # bf16
    assert replicated["attention"] == [2 * all_reduce * 7168, 2 * all_reduce * (1536 + 512 + 64)]
    assert replicated["dense_ffn"] == [all_reduce * 7168] * 2 == sp["dense_ffn"]
    rows = (tp - 1) / tp * 7168 * 2  # all-gathered, forward and backward
    assert replicated["moe"] == [ffn + rows + balance, ffn + rows]
    fp8 = _v3_layer_traffic(tp, True, fp8=True)
    assert fp8["dense_ffn"] == [ffn + (tp - 1) / tp * (7168 + 4 * 56), ffn]


def test_tensor_parallel_plan():
    """A tp=2 plan: split parameters and a smaller per-rank share of the activations (SP smaller again without
    recompute), the tensor-parallel bytes by layer kind adding up to the traffic, and their time over NVLink as a
    term of the step time."""
    plans = {mode: make_plan([*TINY, *overrides], gpu="h100") for mode, overrides in
             ((1, []), (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]), ("2 SP", ["parallel.tp=2"]))}
    mem = {tp: plan["memory_bytes_per_rank"] for tp, plan in plans.items()}
    assert mem[2]["parameters"] < mem[1]["parameters"]
    assert mem[1]["activations"] > mem[2]["activations"] > mem["2 SP"]["activations"]
    assert plans[1]["tensor_parallel_bytes_per_rank_per_step"] is None
    for plan in (plans[2], plans["2 SP"]):
        kinds = plan["tensor_parallel_bytes_per_rank_per_step"]
        total = plan["comm_bytes_per_rank_per_step"]["tensor_parallel"]
        assert total == pytest.approx(sum(v["forward"] + v["backward"] for v in kinds.values() if isinstance(v, dict)))
        assert plan["step_time_terms_s"]["tensor_parallel"] == pytest.approx(total / 153e9)
        assert plan["links"]["tensor_parallel"] == "NVLink"
    assert plans["2 SP"]["tensor_parallel_bytes_per_rank_per_step"]["mode"] == "sequence parallel"
    assert plans[2]["comm_bytes_per_rank_per_step"]["tensor_parallel"] > plans["2 SP"][
        "comm_bytes_per_rank_per_step"]["tensor_parallel"]


def test_context_parallel_plan(capsys):
    """A cp=4 plan against cp=1 for the same sequences: a quarter of the activations plus the gathered latents,
    ZeRO-1 state sharded over dp x cp, the latents' all-gather and reduce-scatter (and with recompute the
    all-gather again) as traffic and a term of the step time, the extra key up-projections as compute; and the
    longest sequence that fits grows with cp."""
    long = ["model=tiny", "train.seq_len=4096", "model.max_seq_len=4096", "train.global_batch_size=4",
            "train.micro_batch_size=1"]
    plans = {(cp, rec): make_plan([*long, f"parallel.cp={cp}", f"train.recompute={rec}"], gpu="h100")
             for cp in (1, 4) for rec in (False, True)}
    args = get_preset("tiny")
    latent = (args.kv_lora_rank + args.qk_rope_head_dim) * 2  # bytes per token: bf16 on a GPU (train.dtype=auto)
    for rec in (False, True):
        one, four = plans[1, rec], plans[4, rec]
        ratio = four["memory_bytes_per_rank"]["activations"] / one["memory_bytes_per_rank"]["activations"]
        assert 0.2 < ratio <= 0.3, (rec, ratio)  # no per-head k, v kept; the gathered latents kept
        assert four["memory_bytes_per_rank"]["optimizer"] == pytest.approx(
            one["memory_bytes_per_rank"]["optimizer"] / 4, rel=0.01)
        layers = args.n_layers + args.mtp_depth
        sent = layers * 4 * (2 + rec) * 3 * 1024 * latent  # 4 micro-batches, (cp - 1) x the local latents
        assert four["comm_bytes_per_rank_per_step"]["context_parallel"] == sent
        assert four["step_time_terms_s"]["context_parallel"] == pytest.approx(sent / 153e9)
        assert four["links"]["context_parallel"] == "NVLink" and one["links"]["context_parallel"] == "none"
        assert four["step_time_terms_s"]["compute"] > one["step_time_terms_s"]["compute"] / 4
    assert main(["model=tiny", "train.seq_len=4096", "model.max_seq_len=4096", "--gpu", "h100", "--longest",
                 "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["model=tiny", "train.seq_len=4096", "model.max_seq_len=4096", "parallel.cp=4", "--gpus", "4",
                 "--gpu", "h100", "--longest", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert four["seq_len"] % 8 == 0 and four["seq_len"] > 3 * one["seq_len"]
    for found in (one, four):
        assert found["total"] <= found["usable"] < found["next_total"]


@pytest.mark.parametrize("overrides, micro_batch", [
    ([], 8),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipe"], 1),
    (["parallel.pp=2", "train.micro_batch_size=2"], 2),
])
def test_micro_batch_is_the_trainers(overrides, micro_batch):
    """The planner plans what launch/train.py would run with the same overrides."""
    assert compose_config(overrides).train.micro_batch_size == micro_batch  # launch/train.py's composition
    assert make_plan(overrides, gpu="cpu")["layout"]["micro_batch_size"] == micro_batch


def test_end_of_step_copies_and_the_usable_memory():
    """Total = the larger of the forward/backward peak and the end of the step (static state plus the larger
    transient copy), against HBM less the stated reserve."""
    dualpipe = make_plan([*TINY, "parallel.pp=2", "parallel.pp_schedule=dualpipe"], gpu="h100")
    bf16_reduce = make_plan([*TINY, "parallel.dp=2", "optim.grad_reduce_dtype=bf16"], gpu="h100")
    for plan in (dualpipe, bf16_reduce):
        for mem in [plan["memory_bytes_per_rank"], *plan["memory_bytes_per_pp_rank"]]:
            static = mem["parameters"] + mem["gradients"] + mem["optimizer"] + mem["fp8_weight_cache"]
            assert mem["end_of_step"] == static + max(mem["partner_grads"], mem["reduce_copies"]) > static
            assert mem["total"] == max(static + mem["activations"], mem["end_of_step"])
    # DualPipe sums every fp32 gradient with the mirror's; a bf16 reduction copies every (dp-sharded) bucket
    mem = dualpipe["memory_bytes_per_rank"]
    assert mem["partner_grads"] == mem["gradients"] and mem["reduce_copies"] == 0
    mem = bf16_reduce["memory_bytes_per_rank"]
    assert mem["reduce_copies"] == mem["gradients"] / 2 and mem["partner_grads"] == 0
    assert (mem["capacity"], mem["usable"]) == (80 * GIB, 0.9 * 80 * GIB) and mem["fits"] is True


def test_json_is_one_object(capsys):
    assert main([*TINY, "parallel.dp=2", "parallel.ep=2", "--gpu", "h200", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    plan = json.loads(out[0])
    for key in ("total_params", "active_params", "flops_per_token", "memory_bytes_per_rank", "step_time_s", "mfu",
                "gpu_hours_per_trillion_tokens", "step_time_terms_s", "bandwidths_gbps", "comm_time_s"):
        assert key in plan
    assert set(plan["step_time_terms_s"]) == {"compute", "tensor_parallel", "context_parallel", "pipeline_bubble",
                                              "all_to_all", "pipeline_p2p", "zero_reduce_scatter", "zero_all_gather",
                                              "partner_all_reduce"}
    assert plan["bandwidths_gbps"] == {"nvlink": 153.0, "ib": 43.0}  # DeepEP's published figures
    assert plan["memory_bytes_per_rank"]["capacity"] == 141 * GIB


def test_text_report_and_exit_codes(capsys):
    assert main([*TINY, "parallel.pp=2", "parallel.pp_schedule=dualpipe", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "fits" in out and "GPU-hours per trillion tokens" in out
    # 8M-token micro-batches do not fit one H100 (~172 GiB of activations)
    big = [*TINY, "train.seq_len=512", "train.micro_batch_size=16384", "train.global_batch_size=16384"]
    assert main(big) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    # the hint: what each knob gives, the nearest change that fits, and the search over layouts
    assert "hint: activations take the most" in out
    assert "nearest fitting change: train.recompute=true" in out  # (recompute keeps SwiGLU inputs only too)
    assert "--gpus 1 --gpu h100 --search" in out
    for term in ("compute", "tensor parallel", "pipeline bubble", "all to all", "pipeline p2p", "zero reduce scatter",
                 "zero all gather", "partner all reduce"):
        assert f"\n  {term} " in out


@pytest.mark.parametrize("argv, message", [
    (["parallel.dp=2", "--gpus", "4"], "--gpus=4 but parallel.dp*pp*cp*tp = 2*1*1*1 = 2"),
    (["parallel.pp=3", "parallel.pp_schedule=dualpipe", "train.global_batch_size=12"], "dualpipe needs an even pp"),
    (["parallel.tp=3"], "parallel.tp=3 must divide parallel.ranks_per_node=8"),
    (["parallel.tp=2", "model.n_heads=3"], "model.n_heads=3 is not divisible by parallel.tp=2"),
    (["--gpu", "tpu"], "argument --gpu: invalid choice: 'tpu'"),
    (["--mfu", "1.5"], "--mfu=1.5 must be in (0, 1]"),
    (["--ib-gbps", "0"], "--ib-gbps=0.0 must be positive"),
    (["--nvlink-gbps", "-5"], "--nvlink-gbps=-5.0 must be positive"),
    (["--ib-gbps", "fast"], "argument --ib-gbps: invalid float value: 'fast'"),
    (["--search"], "--search needs --gpus"),
    (["--search", "--gpus", "2", "--step-time", "1"], "--search models the step time: leave out --step-time"),
    (["train.nonsense=1"], "unknown config key 'train.nonsense'"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


# ---- the step-time model (haillm/tools/plan_time.py) and the search (haillm/tools/plan_search.py) ----

V2_LITE_64 = ["model=v2_lite_16b", "train.global_batch_size=512", "train.seq_len=4096", "train.micro_batch_size=1"]


def _json(capsys, argv: list[str]) -> dict | list:
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def expert_layouts() -> dict:
    """dp64 x ep8 and dp64 x ep64 of v2_lite_16b on 64 H100 (8 per node), as `--json` gives them."""
    return {ep: make_plan([*V2_LITE_64, "parallel.dp=64", f"parallel.ep={ep}"], gpus=64, gpu="h100")
            for ep in (8, 64)}


def test_expert_parallel_layouts_differ_by_their_traffic(expert_layouts):
    """Same FLOPs, so the same compute; ep8 sends its all-to-all within a node (NVLink), ep64 mostly across
    nodes (InfiniBand: 56 of a rank's 63 peers), and without a pipeline none of it is hidden."""
    ep8, ep64 = expert_layouts[8], expert_layouts[64]
    for plan in (ep8, ep64):
        terms = plan["step_time_terms_s"]
        assert plan["step_time_s"] == pytest.approx(sum(terms.values()))
        assert terms["pipeline_bubble"] == terms["pipeline_p2p"] == terms["partner_all_reduce"] == 0
        assert terms["all_to_all"] == plan["comm_time_s"]["all_to_all"] > 0  # no F&B pairs: all exposed
    assert ep8["step_time_terms_s"]["compute"] == ep64["step_time_terms_s"]["compute"]
    assert ep8["links"]["all_to_all"] == "NVLink" and ep64["links"]["all_to_all"].startswith("IB 89%")
    a2a = {ep: plan["comm_bytes_per_rank_per_step"]["all_to_all"] for ep, plan in expert_layouts.items()}
    assert ep8["step_time_terms_s"]["all_to_all"] == pytest.approx(a2a[8] / 153e9)
    assert ep64["step_time_terms_s"]["all_to_all"] == pytest.approx(a2a[64] * 56 / 63 / 43e9)
    # experts are reduced over dp/ep ranks: 8 (one per node) for ep8, none for ep64
    assert ep8["links"]["zero_experts"] == "IB" and ep64["links"]["zero_experts"] == "none"
    assert ep64["step_time_s"] > ep8["step_time_s"] * 1.2


def test_bandwidths_move_the_exposed_communication(capsys):
    base = [*V2_LITE_64, "parallel.dp=64", "parallel.ep=64", "--gpus", "64"]
    default, slow_ib = _json(capsys, base), _json(capsys, [*base, "--ib-gbps", "21.5"])
    assert slow_ib["bandwidths_gbps"] == {"nvlink": 153.0, "ib": 21.5}
    # IB-bound: half the bandwidth, twice the time; the compute does not move
    assert slow_ib["step_time_terms_s"]["all_to_all"] == pytest.approx(2 * default["step_time_terms_s"]["all_to_all"])
    assert slow_ib["step_time_terms_s"]["compute"] == default["step_time_terms_s"]["compute"]
    assert slow_ib["step_time_s"] > default["step_time_s"]
    fast_nvlink = _json(capsys, [*base, "--nvlink-gbps", "450"])
    assert fast_nvlink["step_time_terms_s"]["all_to_all"] == default["step_time_terms_s"]["all_to_all"]


def test_dualpipe_hides_the_all_to_all_that_1f1b_exposes():
    """With compute long enough (a low MFU), DualPipe's F&B pairs hide their all-to-all: only the steps outside
    pairs (warm-up, cool-down) expose theirs. 1F1B exposes all of it, in each step and in its bubble."""
    layout = [*TINY, "train.global_batch_size=32", "train.micro_batch_size=1", "parallel.dp=2", "parallel.ep=2",
              "parallel.pp=2"]  # 16 micro-batches: 13 of DualPipe's 18 steps per rank are F&B pairs
    plans = {s: make_plan([*layout, f"parallel.pp_schedule={s}"], gpu="h100", mfu=0.001) for s in ("1f1b", "dualpipe")}
    one_f_one_b, dualpipe = plans["1f1b"]["step_time_terms_s"], plans["dualpipe"]["step_time_terms_s"]
    assert one_f_one_b["all_to_all"] == pytest.approx(plans["1f1b"]["comm_time_s"]["all_to_all"])
    assert 0 < dualpipe["all_to_all"] < 0.5 * one_f_one_b["all_to_all"]
    for plan in plans.values():
        assert plan["step_time_s"] == pytest.approx(sum(plan["step_time_terms_s"].values()))
    assert "hide" in plans["dualpipe"]["overlap"] and "exposed" in plans["1f1b"]["overlap"]
    # with short compute (a high MFU on a slow network) a pair's exchanges outlast it: the excess is exposed
    slow = make_plan([*layout, "parallel.pp_schedule=dualpipe"], gpu="h100", mfu=1.0,
                     bandwidths=Bandwidths(nvlink_gbps=0.01, ib_gbps=0.01))
    assert slow["step_time_terms_s"]["all_to_all"] > 0.5 * slow["comm_time_s"]["all_to_all"]


def test_search_lists_fitting_valid_layouts_fastest_first(capsys):
    """At the given tp (here 2; 1 unless given), with its traffic as a term of each layout's step time."""
    base = [*TINY[:-1], "parallel.tp=2"]
    assert main([*base, "--gpus", "8", "--gpu", "h100", "--search", "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    assert layouts and [e["step_time_s"] for e in layouts] == sorted(e["step_time_s"] for e in layouts)
    assert {(e["pp"], e["pp_schedule"]) for e in layouts} >= {(1, None), (2, "1f1b"), (2, "dualpipe"), (4, "1f1b")}
    composed = compose_config(base)
    for e in layouts:
        assert e["memory_bytes_per_rank"] <= e["usable_bytes"] == 0.9 * 80 * GIB
        assert e["step_time_s"] == pytest.approx(sum(e["step_time_terms_s"].values()))
        assert e["tp"] == 2 and e["step_time_terms_s"]["tensor_parallel"] > 0
        cfg = OmegaConf.merge(composed, OmegaConf.from_dotlist(e["overrides"]))
        validate(cfg, 8)  # the trainer's validation, for 8 ranks
        assert (cfg.parallel.dp * cfg.parallel.pp * cfg.parallel.tp, cfg.parallel.ep) == (8, e["ep"])
    # an entry is the plan of its overrides (composed and validated as launch/train.py does)
    plan = make_plan([*base, *layouts[0]["overrides"]], gpus=8, gpu="h100")
    assert plan["step_time_s"] == pytest.approx(layouts[0]["step_time_s"])
    assert plan["memory_bytes_per_rank"]["total"] == pytest.approx(layouts[0]["memory_bytes_per_rank"])


def test_search_text_and_fixed_keys(capsys):
    """Keys given on the command line stay fixed (here the pipeline); the text is a table, fastest first."""
    assert main([*V2_LITE_64[:-1], "parallel.pp=8", "parallel.pp_schedule=dualpipev", "--gpus", "64", "--search"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("layouts of 64 x H100 for v2_lite_16b, 512 sequences x 4096 tokens per step: 4 considered")
    rows = [line.split() for line in out[3:-1]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("8", "8", "dualpipev")] * 4
    assert sorted(r[2] for r in rows) == ["1", "2", "4", "8"]
    times = [float(r[6]) for r in rows]
    assert times == sorted(times)
    assert out[-1].startswith("the terms of the fastest: python -m haillm.tools.plan model=v2_lite_16b")
