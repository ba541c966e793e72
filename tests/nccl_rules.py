"""NCCL's rules on top of gloo, for every multi-process test (MACHINE.md: "Gloo is not NCCL").

Gloo forgives what NCCL does not. ``install()`` wraps ``torch.distributed``'s functions in the calling
process so that code which is only right on gloo goes wrong, or fails, here too:

- **Matching by posting order.** Point-to-point transfers travel with tag 0 whatever the caller asked, so
  gloo matches each peer pair's sends and receives of a group in the order they are posted, as NCCL does
  (NCCL has no tags). The tags asked for are logged: a send matched with a receive that asked for another
  tag is reported (``compare``), since that code relied on tags to match.
- **Outputs only after ``wait()``.** An asynchronous collective or receive computes into a private buffer;
  the caller's output holds poison (NaN, or an integer sentinel) until ``wait()`` (or ``is_completed()``
  returning True) copies the result in. Reading it earlier reads poison, as reading before the stream wait
  reads garbage on NCCL. A batch of transfers completes as one request, as NCCL's coalesced batch does.
- **Buffers in flight are untouchable.** The data sent, and the inputs of asynchronous collectives, are
  snapshots taken when the operation is posted; when it completes, the caller's tensor must still hold that
  data (a buffer written or freed before its send completed is an error, because NCCL reads it on its own
  stream at an unknown time), and the poison of an output must be intact (written before ``wait()``).
- **One collective order.** Each rank logs every collective per group (name, dtype, shape, operator) and
  every transfer per (group, sender, receiver); ``compare`` checks the logs of all ranks after the run: the
  same collectives in the same order on every member of a group, and the k-th send of a pair matching the
  k-th receive in shape, dtype and tag. A mismatch names both calls.

What it cannot emulate: the device a tensor lives on (everything is on the CPU here), and the stream order
of one communicator (NCCL runs a group's operations one after another on its stream; the pipeline's posting
plan is checked against that model in tests/test_schedules.py instead).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

LOG_ENV = "HAILLM_NCCL_RULES_LOG"  # a directory: processes started with it (tests/nccl_site) log there


class NcclRuleError(RuntimeError):
    """Code that gloo accepts but NCCL would run wrongly."""


_INT_SENTINELS = {torch.uint8: 0xFF, torch.int8: -128, torch.int16: -(2**15), torch.int32: -(2**31),
                  torch.int64: -(2**62) - 12345}


def _poison(t: torch.Tensor) -> None:
    """Fill ``t`` with a value no collective produces here: NaN (0xFF is also e4m3's NaN for FP8 viewed as
    bytes), or the dtype's sentinel."""
    if t.dtype == torch.bool or t.numel() == 0:
        return
    t.fill_(float("nan") if t.is_floating_point() else _INT_SENTINELS.get(t.dtype, -1))


def _still_poisoned(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool or t.numel() == 0:
        return True
    if t.is_floating_point():
        return bool(torch.isnan(t).all())
    return bool((t == _INT_SENTINELS.get(t.dtype, -1)).all())


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().nbytes() == 0 and a.numel():
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _describe(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


_GROUP_KEYS: dict[int, str] = {}


def _group_key(group: dist.ProcessGroup | None) -> str:
    group = group or c10d._get_default_group()
    key = _GROUP_KEYS.get(id(group))
    if key is None:
        key = _GROUP_KEYS[id(group)] = f"{group.group_name}:{dist.get_process_group_ranks(group)}"
    return key


def _caller() -> str:
    """The innermost frame outside torch and this file: where the operation was called from (frames walked
    directly: a traceback with source lines would cost more than the collectives of a small test)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if "torch/" not in name and not name.endswith("/nccl_rules.py"):
            return f"{os.path.basename(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class _Pending:
    """One asynchronous operation under the rules: the real request computing into private buffers, the
    caller's outputs (poisoned) and the inputs' snapshots to check when it completes."""

    def __init__(self, what: str, works: list, outputs: list[tuple[torch.Tensor, torch.Tensor]],
                 inputs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.what, self.works, self.outputs, self.inputs = what, works, outputs, inputs
        self.done = False

    def finish(self) -> None:
        """Check the buffers in flight were left alone, then hand the results over."""
        if self.done:
            return
        self.done = True
        for user, snapshot in self.inputs:
            if not _bitwise_equal(user, snapshot):
                raise NcclRuleError(f"{self.what}: a buffer it sends was written or freed before it completed "
                                    "(NCCL reads it on its own stream until then)")
        for user, private in self.outputs:
            if not _still_poisoned(user):
                raise NcclRuleError(f"{self.what}: its output was written before wait()")
            user.copy_(private)


class EmulatedWork:
    """What the wrapped asynchronous calls return: ``wait()`` and ``is_completed()`` as on NCCL, where the
    outputs are valid once either says the work is done. Several operations may share one (a batch)."""

    def __init__(self, parts: list[_Pending]):
        self.parts = parts
        _STATE.pending = [w for w in _STATE.pending if not all(p.done for p in w.parts)]
        _STATE.pending.append(self)

    def wait(self, timeout: Any = None) -> bool:
        for part in self.parts:
            if not part.done:  # a finished gloo request must not be waited for again
                for work in part.works:
                    work.wait()
        for part in self.parts:
            part.finish()
        return True

    def is_completed(self) -> bool:
        if not all(part.done or work.is_completed() for part in self.parts for work in part.works):
            return False
        for part in self.parts:
            part.finish()
        return True

    def is_success(self) -> bool:
        return self.is_completed()

    def get_future(self):
        raise NcclRuleError("get_future() is not emulated under the NCCL rules; wait() on the work instead")


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.originals: dict[str, Callable] = {}
        self.collectives: dict[str, list[str]] = defaultdict(list)  # group key -> signatures in call order
        self.transfers: dict[str, list[str]] = defaultdict(list)  # "group|src->dst|send/recv" -> signatures
        self.pending: list[EmulatedWork] = []
        self.lock = threading.Lock()
        self.log_dir: str | None = None


_STATE = _State()


def _record_collective(name: str, group: dist.ProcessGroup | None, detail: str, agree: str | None = None) -> None:
    """Log a collective: ``agree`` is what every rank must call alike (default: ``detail``); an all-to-all's
    sizes legitimately differ between ranks, its dtype and row shape do not."""
    with _STATE.lock:
        log = _STATE.collectives[_group_key(group)]
        log.append(f"{name}({detail if agree is None else agree})|#{len(log) + 1} {name}({detail}) at {_caller()}")


def _record_transfer(kind: str, group: dist.ProcessGroup | None, peer: int, t: torch.Tensor, tag: int) -> None:
    me = dist.get_rank()
    src, dst = (me, peer) if kind == "send" else (peer, me)
    with _STATE.lock:
        log = _STATE.transfers[f"{_group_key(group)}|{src}->{dst}|{kind}"]
        log.append(f"{_describe(t)} tag={tag}|#{len(log) + 1} {kind} at {_caller()}")


def _orig(name: str) -> Callable:
    return _STATE.originals[name]


def _async_collective(name: str, group: dist.ProcessGroup | None, detail: str,
                      outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                      run: Callable[[list[torch.Tensor], list[torch.Tensor]], Any]) -> EmulatedWork:
    """Run ``run(private_outputs, input_snapshots)`` asynchronously; poison ``outputs`` until it completes.
    Inputs that share memory with an output are part of that output (in-place collectives)."""
    snapshots = [t.detach().clone() for t in inputs]
    private = [t.detach().clone() for t in outputs]
    # an input inside an output (in place) is fed from the snapshot and not checked: it is output
    checked = [(t, s) for t, s in zip(inputs, snapshots, strict=True) if not any(_overlaps(t, o) for o in outputs)]
    work = run(private, snapshots)
    for t in outputs:
        _poison(t)
    what = f"{name}({detail}) on group {_group_key(group)} from {_caller()}"
    return EmulatedWork([_Pending(what, [work], list(zip(outputs, private, strict=True)), checked)])


# --- wrappers -----------------------------------------------------------------------------------------------


def _all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    _record_collective("all_reduce", group, f"{_describe(tensor)}, op={op}")
    if not async_op:
        return _orig("all_reduce")(tensor, op=op, group=group)
    return _async_collective("all_reduce", group, _describe(tensor), [tensor], [],
                             lambda out, _: _orig("all_reduce")(out[0], op=op, group=group, async_op=True))


def _out_in(name: str) -> Callable:
    """all_gather_into_tensor / reduce_scatter_tensor and their torch 2.13 names: (output, input, ...)."""

    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        _record_collective(name, group, f"{_describe(output)} <- {_describe(input)}")
        if not async_op:
            return _orig(name)(output, input, *args, group=group, **kwargs)
        return _async_collective(name, group, f"{_describe(output)} <- {_describe(input)}", [output], [input],
                                 lambda out, ins: _orig(name)(out[0], ins[0], *args, group=group, async_op=True,
                                                              **kwargs))

    return wrapper


def _all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
    detail = f"{_describe(output)} <- {_describe(input)}"
    _record_collective("all_to_all_single", group, detail, f"{_describe(input[:0])}")
    if not async_op:
        return _orig("all_to_all_single")(output, input, output_split_sizes, input_split_sizes, group=group)
    return _async_collective(
        "all_to_all_single", group, detail, [output], [input],
        lambda out, ins: _orig("all_to_all_single")(out[0], ins[0], output_split_sizes, input_split_sizes,
                                                    group=group, async_op=True))


def _broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
    _record_collective("broadcast", group, f"{_describe(tensor)}, src={src if src is not None else group_src}")
    kwargs = {"src": src, "group": group, "group_src": group_src}
    if not async_op:
        return _orig("broadcast")(tensor, **kwargs)
    root = c10d._canonicalize_group_rank(group or c10d._get_default_group(), src, group_src, return_global=True)
    if root == dist.get_rank():  # the root only sends: its tensor is an input in flight
        return _async_collective("broadcast", group, _describe(tensor), [], [tensor],
                                 lambda _, ins: _orig("broadcast")(ins[0], async_op=True, **kwargs))
    return _async_collective("broadcast", group, _describe(tensor), [tensor], [],
                             lambda out, _: _orig("broadcast")(out[0], async_op=True, **kwargs))


def _logged(name: str, detail: Callable[..., str] = lambda *a, **k: "") -> Callable:
    """Collectives that run as they are, logged: object collectives (blocking), barrier, the list forms."""

    def wrapper(*args, **kwargs):
        if kwargs.get("async_op"):
            raise NcclRuleError(f"{name}(async_op=True) is not emulated under the NCCL rules")
        _record_collective(name, kwargs.get("group"), detail(*args, **kwargs))
        return _orig(name)(*args, **kwargs)

    return wrapper


def _peer(group, peer, group_peer) -> int:
    return c10d._canonicalize_group_rank(group or c10d._get_default_group(), peer, group_peer, return_global=True)


def _post_send(tensor, dst, group, tag, group_dst) -> _Pending:
    peer = _peer(group, dst, group_dst)
    _record_transfer("send", group, peer, tensor, tag)
    snapshot = tensor.detach().clone()
    work = _orig("isend")(snapshot, dst=peer, group=group, tag=0)
    return _Pending(f"isend to rank {peer} ({_describe(tensor)}, tag {tag}) from {_caller()}", [work], [],
                    [(tensor, snapshot)])


def _post_recv(tensor, src, group, tag, group_src) -> _Pending:
    peer = _peer(group, src, group_src)
    _record_transfer("recv", group, peer, tensor, tag)
    private = torch.empty_like(tensor)
    work = _orig("irecv")(private, src=peer, group=group, tag=0)
    _poison(tensor)
    return _Pending(f"irecv from rank {peer} ({_describe(tensor)}, tag {tag}) from {_caller()}", [work],
                    [(tensor, private)], [])


def _isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    return EmulatedWork([_post_send(tensor, dst, group, tag, group_dst)])


def _irecv(tensor, src=None, group=None, tag=0, group_src=None):
    return EmulatedWork([_post_recv(tensor, src, group, tag, group_src)])


def _send(tensor, dst=None, group=None, tag=0, group_dst=None):
    _isend(tensor, dst, group, tag, group_dst).wait()


def _recv(tensor, src=None, group=None, tag=0, group_src=None):
    _irecv(tensor, src, group, tag, group_src).wait()
    return _peer(group, src, group_src)


def _batch_isend_irecv(p2p_op_list):
    """One request for the whole batch, as NCCL's coalesced batch returns."""
    c10d._check_p2p_op_list(p2p_op_list)
    parts = []
    for op in p2p_op_list:
        if op.op is _isend or op.op is _orig("isend"):
            parts.append(_post_send(op.tensor, None, op.group, op.tag, op.group_peer))
        else:
            parts.append(_post_recv(op.tensor, None, op.group, op.tag, op.group_peer))
    return [EmulatedWork(parts)]


def _shape(*args, **kwargs) -> str:
    return ", ".join(_describe(a) for a in args if isinstance(a, torch.Tensor))


WRAPPERS: dict[str, Callable] = {
    "all_reduce": _all_reduce,
    "all_gather_into_tensor": _out_in("all_gather_into_tensor"),
    "reduce_scatter_tensor": _out_in("reduce_scatter_tensor"),
    "all_gather_single": _out_in("all_gather_single"),
    "reduce_scatter_single": _out_in("reduce_scatter_single"),
    "all_to_all_single": _all_to_all_single,
    "broadcast": _broadcast,
    "barrier": _logged("barrier"),
    "all_gather": _logged("all_gather", _shape),
    "reduce_scatter": _logged("reduce_scatter", _shape),
    "all_to_all": _logged("all_to_all"),
    "reduce": _logged("reduce", _shape),
    "gather": _logged("gather", _shape),
    "scatter": _logged("scatter", _shape),
    "all_gather_object": _logged("all_gather_object"),
    "broadcast_object_list": _logged("broadcast_object_list"),
    "gather_object": _logged("gather_object"),
    "scatter_object_list": _logged("scatter_object_list"),
    "isend": _isend,
    "irecv": _irecv,
    "send": _send,
    "recv": _recv,
    "batch_isend_irecv": _batch_isend_irecv,
}


def install(log_dir: str | None = None, dump_on: str | None = None) -> None:
    """Put the rules in place for this process (before any collective). ``log_dir``: ``write_log`` writes this
    rank's log there at exit too (for processes the test does not control, such as torchrun's workers).
    ``dump_on``: a path whose appearance makes a thread write the log to ``<dump_on>.rank<r>.json`` even while
    the rank hangs in a collective (a mismatch usually hangs before anyone can compare)."""
    if _STATE.installed:
        return
    if dump_on:
        threading.Thread(target=_dump_when_asked, args=(dump_on,), daemon=True).start()
    for name, wrapper in WRAPPERS.items():
        if hasattr(dist, name):
            _STATE.originals[name] = getattr(dist, name)
            setattr(dist, name, functools.wraps(_STATE.originals[name])(wrapper))
    # P2POp accepts only the functions it knows; make it accept the wrapped ones (and keep the originals'
    # names in c10d itself, whose internals call them)
    c10d.isend, c10d.irecv = dist.isend, dist.irecv
    _STATE.installed = True
    _STATE.log_dir = log_dir
    if log_dir:
        import atexit

        atexit.register(write_log)


def _dump_when_asked(trigger: str) -> None:
    import time

    while not os.path.exists(trigger):
        time.sleep(0.2)
    with _STATE.lock:
        write_log(f"{trigger}.rank{dist.get_rank() if dist.is_initialized() else 0}.json")


def finish_pending(timeout_s: float = 20.0) -> None:
    """Complete every request still outstanding and run its checks (end of a rank's work); one never matched
    by a peer is an error after ``timeout_s``."""
    import datetime

    for work in _STATE.pending:
        for part in work.parts:
            for real in [] if part.done else part.works:
                try:
                    real.wait(datetime.timedelta(seconds=timeout_s))
                except RuntimeError as exc:
                    raise NcclRuleError(f"{part.what} never completed: {str(exc).splitlines()[0]}") from None
        for part in work.parts:
            part.finish()
    _STATE.pending.clear()


def log_state() -> dict[str, Any]:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    return {"rank": rank, "collectives": dict(_STATE.collectives), "transfers": dict(_STATE.transfers)}


def write_log(path: str | None = None) -> None:
    """This rank's logs as JSON (``path``, or ``rank<r>.json`` in the install's ``log_dir``)."""
    state = log_state()
    if path is None:
        if not _STATE.log_dir:
            return
        path = os.path.join(_STATE.log_dir, f"rank{state['rank']}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def compare(logs: list[dict[str, Any]]) -> list[str]:
    """Every disagreement between the ranks' logs, one line each (empty: they agree)."""
    problems = []
    by_group: dict[str, dict[int, list[str]]] = defaultdict(dict)
    for log in logs:
        for group, calls in log["collectives"].items():
            by_group[group][log["rank"]] = calls
    for group, calls in by_group.items():
        ranks = sorted(calls)
        base = ranks[0]
        for r in ranks[1:]:
            problems += _first_difference(f"group {group}", base, calls[base], r, calls[r])
    transfers: dict[str, list[str]] = {}
    for log in logs:
        transfers.update(log["transfers"])
    for key, sends in transfers.items():
        group, pair, kind = key.split("|")
        if kind != "send":
            continue
        recvs = transfers.get(f"{group}|{pair}|recv", [])
        src, dst = pair.split("->")
        for k in range(max(len(sends), len(recvs))):
            send = sends[k] if k < len(sends) else None
            recv = recvs[k] if k < len(recvs) else None
            if send is None or recv is None or send.split("|")[0] != recv.split("|")[0]:
                problems.append(f"group {group}: transfer {k + 1} from rank {src} to rank {dst}: the sender posted "
                                f"{_transfer_text(send)}, the receiver {_transfer_text(recv)}")
                break
    for key, recvs in transfers.items():
        group, pair, kind = key.split("|")
        if kind == "recv" and f"{group}|{pair}|send" not in transfers:
            problems.append(f"group {group}: rank {pair.split('->')[1]} posted {len(recvs)} receives from rank "
                            f"{pair.split('->')[0]}, which sent nothing: first {_transfer_text(recvs[0])}")
    return problems


def _transfer_text(entry: str | None) -> str:
    if entry is None:
        return "nothing"
    signature, where = entry.split("|")
    return f"{signature} ({where})"


def _first_difference(where: str, ra: int, a: list[str], rb: int, b: list[str]) -> list[str]:
    for k in range(max(len(a), len(b))):
        ca = a[k].split("|", 1) if k < len(a) else None
        cb = b[k].split("|", 1) if k < len(b) else None
        if ca is None or cb is None or ca[0] != cb[0]:
            return [f"{where}: collective {k + 1} differs: rank {ra} called {ca[1] if ca else 'nothing'}, "
                    f"rank {rb} called {cb[1] if cb else 'nothing'}"]
    return []


def subprocess_env(log_dir: str | Path | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a launcher (torchrun) whose workers run under the rules and log to ``log_dir`` (None:
    no logs, for runs whose ranks are killed on purpose)."""
    env = dict(os.environ if env is None else env)
    site = str(Path(__file__).resolve().parent / "nccl_site")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH", "")]))
    env[LOG_ENV] = "" if log_dir is None else str(log_dir)
    return env


def check_logs(log_dir: str | Path, world_size: int) -> None:
    """The logs of a launcher's ``world_size`` workers exist and agree (AssertionError naming the calls)."""
    logs = read_logs(log_dir)
    assert sorted(log["rank"] for log in logs) == list(range(world_size)), f"logs of ranks {[x['rank'] for x in logs]}"
    problems = compare(logs)
    assert not problems, "the ranks broke NCCL's matching rules:\n" + "\n".join(problems[:10])


def read_logs(directory: str | Path, pattern: str = "rank*.json") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob(pattern))]
