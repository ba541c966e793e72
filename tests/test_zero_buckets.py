"""The ZeRO-1 bucket layout as a pure function (haillm.parallel.zero_buckets), hand-checked."""

from __future__ import annotations

import torch

from haillm.parallel.zero_buckets import ParamSpec, plan_buckets

F32, BF16 = torch.float32, torch.bfloat16


def test_reverse_order_dtype_split_size_limit_and_padding():
    specs = [ParamSpec("a", (3, 4), F32), ParamSpec("b", (5,), F32), ParamSpec("c", (2, 2), BF16),
             ParamSpec("d", (7,), BF16), ParamSpec("e", (10,), F32)]
    # 40 bytes of fp32 per bucket: e (40 B) alone; d, c share a dtype; b and a together exceed 40 B only at a
    plans = plan_buckets([specs], [4], bucket_bytes=40)
    assert [[specs[i].name for i in p.members] for p in plans] == [["e"], ["d", "c"], ["b", "a"]]
    assert [p.offsets for p in plans] == [(0,), (0, 7), (0, 5)]
    assert [p.numel for p in plans] == [12, 12, 20]  # 10, 11, 17 padded to multiples of 4
    assert [p.dtype for p in plans] == [F32, BF16, F32]
    assert plans[1].param_bytes() == 24 and plans[1].grad_bytes() == 48
    assert plans[1].state_bytes(F32) == 3 * 4 + 2 * 3 * 4  # bf16 params: an fp32 master shard too
    assert plans[0].state_bytes(BF16) == 2 * 3 * 2  # fp32 params: the master shard is the parameter slice


def test_groups_are_bucketed_apart_in_gradient_ready_order_and_tied_params_once():
    dense = [ParamSpec("embed", (8,), F32, key="shared"), ParamSpec("norm", (2,), F32)]
    experts = [ParamSpec("expert", (6,), F32), ParamSpec("head", (8,), F32, key="shared")]
    plans = plan_buckets([dense, experts], [2, 3], bucket_bytes=1 << 20)
    names = [[(dense, experts)[p.group][i].name for i in p.members] for p in plans]
    # the tied weight is stepped once, in the first group holding it; it is ready when "head" is, i.e. first
    assert names == [["norm", "embed"], ["expert"]]
    assert [(p.world, p.numel) for p in plans] == [(2, 10), (3, 6)]
