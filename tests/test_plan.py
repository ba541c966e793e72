"""The layout planner (`python -m haillm.tools.plan`) against DeepSeek-V3's published figures
(shared/REFERENCE.md §5: ISCA'25 Table 2 and 4, the V3 report's cost table), its output contract and bad input.
Memory against measured runs is tests/test_plan_memory.py."""

from __future__ import annotations

import json

import pytest
import torch

from haillm.config import compose_config
from haillm.fp8.policy import FP8_TINY_OVERRIDES
from haillm.models.deepseek_v3.args import get_preset
from haillm.models.deepseek_v3.flops import count_params, flops_per_token
from haillm.tools.plan import GIB, main, make_plan
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
    # with recompute and FP8 off (the defaults), our activations keep 3.12 GiB per MoE layer per 4096-token
    # micro-batch, 12.48 GiB per middle stage of 4 layers, 17 of them in flight: this layout does not fit 80 GiB
    assert middle["activations_per_microbatch"] == pytest.approx([4 * 3.12 * GIB] * 2, rel=1e-3)
    assert mem["fits"] is False and mem["capacity"] == 80 * GIB
    comm = plan["comm_bytes_per_rank_per_step"]
    assert comm["all_to_all"] > comm["pipeline_p2p"] > 0
    # each mirror pair all-reduces every fp32 gradient: the gradient buckets less their padding
    for rank, sent in zip(ranks, plan["comm_bytes_per_pp_rank_per_step"], strict=True):
        assert rank["gradients"] - 128 * 4 * rank["buckets"] < sent["partner_all_reduce"] <= rank["gradients"]


def test_assumed_mfu_gives_the_step_time():
    plan = make_plan([*TINY, "parallel.dp=2"], gpu="h100", mfu=0.5)
    flops = plan["tokens_per_step"] * plan["flops_per_token"]
    assert plan["step_time_s"] == pytest.approx(flops / (2 * 989e12 * 0.5))
    assert plan["mfu"] == 0.5 and plan["memory_bytes_per_rank"]["fits"] is True
    measured = make_plan([*TINY, "parallel.dp=2"], gpu="h100", step_time=plan["step_time_s"])
    assert measured["mfu"] == pytest.approx(0.5)
    assert measured["gpu_hours_per_trillion_tokens"] == pytest.approx(plan["gpu_hours_per_trillion_tokens"])


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
    args = get_preset("tiny")
    embedding = args.vocab_size * args.dim * 4 if mtp_depth else 0
    assert [r["partner_grads"] for r in plan["memory_bytes_per_pp_rank"]] == [embedding, 0, 0, embedding]
    sent = [c["partner_all_reduce"] for c in plan["comm_bytes_per_pp_rank_per_step"]]
    assert sent == [embedding, 0, 0, embedding]
    assert plan["comm_bytes_per_rank_per_step"]["partner_all_reduce"] == embedding


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
                "gpu_hours_per_trillion_tokens"):
        assert key in plan
    assert plan["memory_bytes_per_rank"]["capacity"] == 141 * GIB


def test_text_report_and_exit_codes(capsys):
    assert main([*TINY, "parallel.pp=2", "parallel.pp_schedule=dualpipe", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "fits" in out and "GPU-hours per trillion tokens" in out
    # 8M-token micro-batches do not fit one H100 (~172 GiB of activations)
    big = [*TINY, "train.seq_len=512", "train.micro_batch_size=16384", "train.global_batch_size=16384"]
    assert main(big) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["parallel.dp=2", "--gpus", "4"], "--gpus=4 but parallel.dp*pp*tp = 2*1*1 = 2"),
    (["parallel.pp=3", "parallel.pp_schedule=dualpipe", "train.global_batch_size=12"], "dualpipe needs an even pp"),
    (["parallel.tp=2"], "parallel.tp=2 is not yet supported"),
    (["--gpu", "tpu"], "argument --gpu: invalid choice: 'tpu'"),
    (["--mfu", "1.5"], "--mfu=1.5 must be in (0, 1]"),
    (["train.nonsense=1"], "unknown config key 'train.nonsense'"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
