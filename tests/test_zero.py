"""ZeroAdamW against single-process torch.optim.AdamW on the same global batch, plus sharding, no_sync,
memory and DCP resharding checks. Multi-process parts run on forked gloo ranks (tests/dist.py)."""

import contextlib
import gc
import math
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from dist import run_distributed
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from haillm.parallel.zero import ZeroAdamW
from haillm.parallel.zero_state import _flat_range_boxes

GLOBAL_BATCH, MICRO = 16, 2
HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MAX_NORM = 0.5  # small enough that some steps clip
BUCKET_MB = 500 * 4 / 2**20  # ≈ 500 fp32 elements: several buckets, params split across shards


class TinyNet(nn.Module):
    """Params of many shapes: 2-D weights, biases, LayerNorm vectors, a 0-d scalar."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 24, bias=False)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(24, 5)
        self.use_scale = True  # False: `scale` gets no gradient (like an expert that got no tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc2(F.gelu(self.norm(F.gelu(self.fc1(x))))))
        return self.head(h * self.scale if self.use_scale else h)


def make_model(hidden: int = 32, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(hidden).to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def reference_run(steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain torch: full global batch, AdamW with decay on >= 2-D params only, global-norm clipping."""
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    hp = {k: v for k, v in HPARAMS.items() if k != "weight_decay"}
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": HPARAMS["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        **hp,
    )
    norms = []
    for step in range(steps):
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def train_steps(model, opt, steps, first_step=0, log=None):
    """The trainer's loop: micro-batches of this rank's slice, all but the last under no_sync()."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = GLOBAL_BATCH // world
    norms = []
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        for m, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)):
            last = m == MICRO - 1
            if log is not None:
                log.append(("begin",))
            with contextlib.nullcontext() if last else opt.no_sync():
                out = model(xm.to(model.fc1.weight.dtype)).float()
                (F.mse_loss(out, ym) / MICRO).backward()
            if log is not None:
                log.append(("end", last))
        norms.append(opt.clip_grad_norm_(MAX_NORM))
        opt.step()
        if log is not None:
            log.append(("gathers_pending", any(b.gather_work is not None for b in opt._buckets)))
        opt.zero_grad()
    return norms


class CollectiveLog(list):
    """Wrap torch.distributed collectives to record which ones run between the trainer's phases (under torch
    2.13's names; on torch 2.11, which lacks the ``*_single`` ones, their older names are wrapped instead)."""

    NAMES = ("reduce_scatter_single", "all_gather_single", "all_reduce", "broadcast", "all_gather")
    TORCH_2_11_NAMES = {"reduce_scatter_single": "reduce_scatter_tensor", "all_gather_single": "all_gather_into_tensor"}

    def __enter__(self):
        self.saved = {}
        for name in self.NAMES:
            attr = name if hasattr(dist, name) else self.TORCH_2_11_NAMES[name]
            self.saved[attr] = getattr(dist, attr)
            setattr(dist, attr, self._wrap(name, self.saved[attr]))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.append(name)
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _zero_worker(steps, opt_kwargs, model_dtype=torch.float32, overlap=False, unused_on_rank=None):
    model = make_model(dtype=model_dtype)
    model.use_scale = dist.get_rank() != unused_on_rank
    opt = ZeroAdamW(
        model.named_parameters(), **HPARAMS, process_group=dist.group.WORLD, bucket_mb=BUCKET_MB, **opt_kwargs
    )
    if overlap:
        opt.register_forward_wait(model)
    log = CollectiveLog()
    with log:
        norms = train_steps(model, opt, steps, log=log)
    opt.wait_params()  # no forward follows the last step: wait for its gathers explicitly
    params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    state_numel = sum(t.numel() for b in opt._buckets for t in b.state.values())
    grads_are_views = all(
        p.grad is None or p.grad.data_ptr() in range(b.grad_buf.data_ptr(), b.grad_buf.data_ptr() + b.numel * 4)
        for b in opt._buckets
        for p in b.params
    )
    return dict(
        params=params,
        norms=norms,
        log=list(log),
        state_bytes=opt.state_bytes(),
        state_numel=state_numel,
        buckets=len(opt._buckets),
        padded=sum(b.numel for b in opt._buckets),
        grads_are_views=grads_are_views,
    )


def _phases(log):
    """(is_last_micro_batch, collectives issued during that forward+backward) for every micro-batch."""
    phases, current = [], []
    for entry in log:
        if entry == ("begin",):
            current = []
        elif entry[0] == "end":
            phases.append((entry[1], current))
        else:
            current.append(entry)
    return phases


@pytest.mark.parametrize("dp", [2, 4])
def test_parity_with_torch_adamw(dp):
    steps = 5
    ref, ref_norms = reference_run(steps)
    results = run_distributed(_zero_worker, world_size=dp, args=(steps, {}))
    for r in results:
        for name, p in ref.items():
            torch.testing.assert_close(r["params"][name], p, rtol=0, atol=1e-6, msg=name)
        assert r["norms"] == pytest.approx(ref_norms, rel=1e-5)
    assert max(ref_norms) > MAX_NORM  # clipping was exercised
    first = results[0]
    assert first["buckets"] >= 2 and first["grads_are_views"]
    # no_sync backward issues no collective at all; the final backward reduce-scatters every bucket
    for last, ops in _phases(first["log"]):
        assert ops.count("reduce_scatter_single") == (first["buckets"] if last else 0)
        if not last:
            assert ops == []
    assert ("gathers_pending", True) not in first["log"]  # without register_forward_wait, step waits


def test_gathers_overlap_next_forward_when_modules_wait():
    steps = 3
    ref, _ = reference_run(steps)
    results = run_distributed(_zero_worker, world_size=2, args=(steps, {}), kwargs={"overlap": True})
    for name, p in ref.items():
        torch.testing.assert_close(results[0]["params"][name], p, rtol=0, atol=1e-6, msg=name)
    assert results[0]["log"].count(("gathers_pending", True)) == steps  # step returned before gathers


def test_param_without_grad_on_one_rank_keeps_collectives_matched():
    # rank 1 never produces a gradient for `scale`: its bucket is only launched by step(), in order
    results = run_distributed(_zero_worker, world_size=2, args=(2, {}), kwargs={"unused_on_rank": 1})
    for name, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][name]), name
    assert not torch.equal(results[0]["params"]["scale"], make_model().scale.detach())


@pytest.mark.parametrize("dp", [2, 4])
def test_state_is_one_dp_th_of_unsharded(dp):
    results = run_distributed(_zero_worker, world_size=dp, args=(1, {}))
    n_params = sum(p.numel() for p in make_model().parameters())
    unsharded = n_params * (4 + 4 + 4)  # fp32 master + two fp32 moments
    for r in results:
        assert r["state_bytes"] == r["state_numel"] * 4
        padding = r["padded"] - n_params  # < one bucket's padding per bucket: at most dp - 1 each
        assert 0 <= padding <= r["buckets"] * (dp - 1)
        assert unsharded / dp <= r["state_bytes"] <= (unsharded + padding * 12) / dp
    assert sum(r["state_numel"] for r in results) == 3 * results[0]["padded"]


@pytest.mark.parametrize(
    "opts, model_dtype, max_err, mean_err",
    [
        ({"moment_dtype": torch.bfloat16}, torch.float32, 2e-4, 0.002),
        # bf16 gradients flip Adam's sign where the gradient is ~0: judge the mean, not the worst element
        ({"reduce_dtype": torch.bfloat16}, torch.float32, None, 0.01),
        # bf16 params: micro-batch gradients accumulate in the fp32 buffer (losing one would cost ~50%)
        ({}, torch.bfloat16, None, 0.1),
    ],
    ids=["bf16_moments", "bf16_reduce", "bf16_params"],
)
def test_low_precision_options_stay_close(opts, model_dtype, max_err, mean_err):
    steps = 3
    ref, _ = reference_run(steps)
    init = dict(make_model().named_parameters())
    results = run_distributed(_zero_worker, world_size=2, args=(steps, opts, model_dtype))
    moment_bytes = 2 if opts.get("moment_dtype") == torch.bfloat16 else 4
    assert results[0]["state_bytes"] == results[0]["state_numel"] // 3 * (4 + 2 * moment_bytes)
    assert results[0]["grads_are_views"]  # fp32 .grad views the buffer; bf16 .grad is moved into it
    for name, p in ref.items():
        got = results[0]["params"][name]
        assert torch.equal(got, results[1]["params"][name])  # ranks agree exactly
        err, update = (got - p).abs(), (p - init[name].detach()).abs()
        assert err.mean() < mean_err * update.mean(), name
        if max_err is not None:
            assert err.max() < max_err, name


def test_dp1_without_process_group_matches_torch_adamw():
    steps = 4
    ref, ref_norms = reference_run(steps)
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, bucket_mb=BUCKET_MB)
    norms = train_steps(model, opt, steps)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[name], rtol=0, atol=1e-6, msg=name)
    assert norms == pytest.approx(ref_norms, rel=1e-5)


def _zero_worker_without_single_collectives(steps: int) -> dict[str, torch.Tensor]:
    """As on torch 2.11, which has reduce_scatter_tensor / all_gather_into_tensor but not the *_single names."""
    for name in ("reduce_scatter_single", "all_gather_single"):  # this worker process's module only
        if hasattr(dist, name):
            delattr(dist, name)
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, process_group=dist.group.WORLD, bucket_mb=BUCKET_MB)
    train_steps(model, opt, steps)
    opt.wait_params()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_collectives_under_their_torch_2_11_names():
    steps = 3
    ref, _ = reference_run(steps)
    for params in run_distributed(_zero_worker_without_single_collectives, world_size=2, args=(steps,)):
        for name, p in ref.items():
            torch.testing.assert_close(params[name], p, rtol=0, atol=1e-6, msg=name)


def test_close_releases_the_optimizer():
    """The hooks hold the optimizer from tensors the garbage collector cannot see into; close removes them."""
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, bucket_mb=BUCKET_MB)
    opt.register_forward_wait(model)
    train_steps(model, opt, 1)
    alive = weakref.ref(opt)
    opt.close()
    del opt
    gc.collect()
    assert alive() is None
    model(batch(0)[0])  # the model still runs without the optimizer's hooks


def test_a_side_reader_orders_after_the_gathers_without_taking_them():
    """``order_after_gathers`` (the EMA's copy stream) waits for every gather in flight and leaves them for the
    forward's per-module waits; ``wait_params`` takes them."""
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, bucket_mb=BUCKET_MB)
    waits = []

    class Work:
        def wait(self) -> bool:
            waits.append(self)
            return True

    works = [Work() for _ in opt._buckets]
    for b, w in zip(opt._buckets, works, strict=True):
        b.gather_work = w
    opt.order_after_gathers()
    assert waits == works and [b.gather_work for b in opt._buckets] == works
    opt.wait_params()
    assert waits == works * 2 and all(b.gather_work is None for b in opt._buckets)


def test_compiled_region_waits_for_all_its_parameters_at_entry():
    """A region (a torch.compile'd module, haillm.train.compile) waits for the buckets of all its parameters,
    its submodules' included, in one pre-hook of its own; its submodules get none (they would run inside the
    compiled code). Modules outside regions keep their own hooks."""
    model = nn.Sequential(make_model(), nn.Linear(5, 5))
    region = model[0]
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, bucket_mb=BUCKET_MB)
    opt.register_forward_wait(model, regions=[region])
    assert all(not m._forward_pre_hooks for m in region.modules() if m is not region)
    (hook,) = region._forward_pre_hooks.values()
    assert {id(p) for p in region.parameters()} <= {id(p) for b in hook.args[0] for p in b.params}
    assert len(model[1]._forward_pre_hooks) == 1
    opt.close()


def test_flat_range_boxes_cover_the_range_in_memory_order():
    shape = (3, 4, 5)
    full = torch.arange(60).view(shape)
    for lo, hi in [(0, 60), (7, 8), (3, 47), (20, 40), (19, 41), (0, 1), (59, 60)]:
        pieces = [
            full[tuple(slice(o, o + s) for o, s in zip(off, size, strict=True))].reshape(-1)
            for off, size in _flat_range_boxes(lo, hi, shape)
        ]
        assert torch.equal(torch.cat(pieces), torch.arange(lo, hi))


# ---- checkpoint: save at dp=2, resume at dp=1 and dp=4 ----
SAVE_AFTER = 3


def _save_worker(path):
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, process_group=dist.group.WORLD, bucket_mb=BUCKET_MB)
    train_steps(model, opt, SAVE_AFTER)
    dcp.save({"optim": opt}, checkpoint_id=path)
    train_steps(model, opt, 1, first_step=SAVE_AFTER)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def resume_and_step(path):
    model = make_model()  # initial weights: everything the next step needs comes from the checkpoint
    group = dist.group.WORLD if dist.is_initialized() else None
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, process_group=group, bucket_mb=BUCKET_MB / 3)
    dcp.load({"optim": opt}, checkpoint_id=path)
    assert opt.step_count == SAVE_AFTER
    train_steps(model, opt, 1, first_step=SAVE_AFTER)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpoint_saved_at_dp2_resumes_at_dp1_and_dp4(tmp_path):
    path = str(tmp_path / "ckpt")
    continued = run_distributed(_save_worker, world_size=2, args=(path,))[0]
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    assert tuple(meta["optim.state.fc1.weight.exp_avg"].size) == (32, 16)  # stored in the param's shape
    assert tuple(meta["optim.state.scale.master"].size) == (1,)
    resumed = {1: resume_and_step(path), 4: run_distributed(resume_and_step, world_size=4, args=(path,))[0]}
    for dp, params in resumed.items():
        for name, p in continued.items():
            torch.testing.assert_close(params[name], p, rtol=0, atol=1e-6, msg=f"dp={dp} {name}")


def test_checkpoint_from_another_model_shape_is_refused(tmp_path):
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS)
    dcp.save({"optim": opt}, checkpoint_id=str(tmp_path))
    wider = make_model(hidden=40)
    with pytest.raises(CheckpointException, match="Size mismatch"):  # a BaseException, not an Exception
        dcp.load({"optim": ZeroAdamW(wider.named_parameters(), **HPARAMS)}, checkpoint_id=str(tmp_path))


# ---- gradient norm across dp, expert (edp + ep) and pipeline groups ----
DP, EP, PP = 4, 2, 2


def fake_grad(kind: int, stage: int, dp_rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 * kind + 10 * stage + dp_rank))


def _norm_worker():
    from haillm.parallel.mesh import ParallelDims

    dims = ParallelDims(dp=DP, pp=PP, ep=EP, world_size=dist.get_world_size()).build()
    dense, expert = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(3, 2))
    groups = [
        {"params": [("dense", dense)], "process_group": dims.dp_group},
        # an expert's params: one copy per edp rank, and each ep rank holds a different expert
        {"params": [("expert", expert)], "process_group": dims.edp_group, "norm_groups": (dims.ep_group,)},
    ]
    opt = ZeroAdamW(groups, norm_groups=(dims.pp_group,), bucket_mb=1e-5)
    dense.grad.copy_(fake_grad(0, dims.pp_rank, dims.dp_rank, 10))
    expert.grad.copy_(fake_grad(1, dims.pp_rank, dims.dp_rank, 6).view(3, 2))
    norm = opt.clip_grad_norm_(1.0)
    clipped = opt.clip_grad_norm_(float("inf"))  # the scaled shards now have the clipped norm
    opt.zero_grad()
    if dims.rank == 3:
        dense.grad[0] = float("inf")  # one rank's overflow must reach every rank's norm
    return norm, clipped, opt.clip_grad_norm_(1.0)


def test_grad_norm_sums_dp_expert_and_pipeline_groups():
    expected_sq = 0.0
    for stage in range(PP):
        dense = torch.stack([fake_grad(0, stage, d, 10) for d in range(DP)]).mean(0)
        expected_sq += dense.square().sum().item()
        for e in range(EP):  # dp_rank = edp_rank * ep + ep_rank: expert e lives on dp ranks with d % ep == e
            expert = torch.stack([fake_grad(1, stage, d, 6) for d in range(DP) if d % EP == e]).mean(0)
            expected_sq += expert.square().sum().item()
    results = run_distributed(_norm_worker, world_size=DP * PP)
    for norm, clipped, nonfinite in results:
        assert norm == pytest.approx(expected_sq**0.5, rel=1e-6)
        assert clipped == pytest.approx(1.0, rel=1e-5)
        assert not math.isfinite(nonfinite)


def test_replaced_grad_is_taken_as_the_gradient():
    """Code that assigns `.grad` (torch's model.zero_grad(), a manual weight-grad pass) is honoured."""
    model = make_model()
    opt = ZeroAdamW(model.named_parameters(), **HPARAMS, bucket_mb=BUCKET_MB)
    x, y = batch(0)
    with opt.no_sync():
        F.mse_loss(model(x[:8]), y[:8]).backward()
    model.zero_grad()  # sets .grad to None: the first micro-batch is discarded, as in plain torch
    model.fc1.weight.requires_grad_(False)  # its gradient comes from a manual pass: no autograd hook fires
    F.mse_loss(model(x[8:]), y[8:]).backward()
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 0.5)
    opt.finish_grad_sync()
    ref = make_model()
    F.mse_loss(ref(x[8:]), y[8:]).backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters(), strict=True):
        b, i = opt._bucket_of[id(p)]
        used = b.shard_grad[b.offsets[i] : b.offsets[i] + p.numel()].view_as(p)  # what step() will apply
        expected = torch.full_like(r, 0.5) if name == "fc1.weight" else r.grad
        torch.testing.assert_close(used, expected, rtol=0, atol=1e-7, msg=name)
        assert p.grad.data_ptr() == used.data_ptr()


def test_positional_params_are_refused():
    with pytest.raises(TypeError, match="named_parameters"):
        ZeroAdamW(make_model().parameters())
