"""Preemption, torchrun restarts, crashes during a checkpoint write, and hang protection, end to end.

Exact comparisons: fp32, `train.deterministic=true`, one thread per rank, so an interrupted and resumed run
must reproduce the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nccl_rules
import pytest
import torch
import torch.distributed as dist
from dist import run_distributed
from nccl_rules import subprocess_env
from test_train import launch_train, snapshot
from test_train_dp import COMMON

from haillm.config import compose_config, validate
from haillm.train import checkpoint, faults
from haillm.train.checkpoint import list_checkpoints, verify
from haillm.train.evaluate import Evaluator
from haillm.train.watchdog import Watchdog, holdups, is_comm_failure, patience

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "launch" / "train.py")
RESTART = [*COMMON, "parallel.dp=2", "checkpoint.interval=5", "train.steps=14", "checkpoint.resume=auto"]


def _main(argv: list[str]) -> int:
    return launch_train.main(argv)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def env_with(**extra: str) -> dict[str, str]:
    """The environment of a launched job; its ranks run under NCCL's rules (tests/nccl_rules.py), unlogged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    return subprocess_env(None, env)


def torchrun(args: list[str], env: dict[str, str], nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", TRAIN, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_process(argv: list[str], rank: int, world: int, port: int, err_path: str, env: dict[str, str]) -> None:
    """One rank of `run_ranks`: joins through torch.distributed's env:// (as under torchrun, so the process
    group takes its timeout from the config), stderr to a file, the exit code is main's."""
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    os.dup2(err, 2)  # C-level output, and Python's (pytest replaced sys.stderr)
    sys.stderr = os.fdopen(err, "w", buffering=1)
    torch.set_num_threads(1)
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    nccl_rules.install()
    os._exit(launch_train.main(argv))


def run_ranks(argv: list[str], world: int, tmp: Path, timeout: float = 180, **env: str) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank of a forked job, however the ranks end (os._exit from a watchdog too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_process, args=(argv, r, world, port, str(tmp / f"rank{r}.err"), env))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout} s"
    return [(p.exitcode, (tmp / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("haillm: error:")]


# ------------------------------------------------------------------------------------------- preemption


def test_sigterm_stops_after_the_step_and_resume_is_exact(tmp_path, capsys, monkeypatch):
    """SIGTERM during step 4 of 8: step 4 completes, step_4 is written, exit 0 with one line saying where;
    resuming reproduces the uninterrupted run exactly."""
    fast = [*COMMON, "train.steps=8", "checkpoint.interval=100", "optim.schedule=constant"]
    assert launch_train.main([*fast, f"output_dir={tmp_path / 'whole'}"]) == 0
    run = tmp_path / "run"
    monkeypatch.setenv("HAILLM_FAULT", "sigterm:step=4")
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    assert launch_train.main([*fast, f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    monkeypatch.delenv("HAILLM_FAULT")
    assert [line for line in out.splitlines() if line.startswith("haillm:")] == [
        f"haillm: stopped by SIGTERM after step 4; checkpoint {run / 'checkpoints' / 'step_4'} "
        "(continue with checkpoint.resume=auto)"]
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    assert [step for step, _ in list_checkpoints(run)] == [4]
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    assert launch_train.main([*fast, f"output_dir={run}", "checkpoint.resume=auto"]) == 0
    assert losses(run) == losses(tmp_path / "whole")


def test_signal_on_one_rank_stops_every_rank(tmp_path):
    """SIGTERM reaches rank 1 of 2 only: both agree, stop after the same step, exit 0."""
    run = tmp_path / "run"
    argv = [*COMMON, "parallel.dp=2", "train.steps=20", f"output_dir={run}"]
    os.environ["HAILLM_FAULT"] = "sigterm:step=3:rank=1"
    try:
        assert run_distributed(_main, world_size=2, args=(argv,), timeout=240) == [0, 0]
    finally:
        del os.environ["HAILLM_FAULT"]
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    assert [step for step, _ in list_checkpoints(run)] == [3] and verify(run / "checkpoints" / "step_3") is None


def test_second_signal_exits_at_once_and_corrupts_nothing(tmp_path):
    """Two SIGTERMs in a row, while step 5 is running: the process ends at once (killed by the second), the
    complete checkpoints are untouched and the run resumes from the newest of them."""
    run = tmp_path / "run"
    args = [*COMMON, "train.steps=10", "checkpoint.interval=2", f"output_dir={run}"]
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=env_with(HAILLM_FAULT="stall:step=5:seconds=60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(records(run)) == 4 and len(list_checkpoints(run)) == 2:
            break
        time.sleep(0.05)
    done = {path.name: snapshot(path) for _, path in list_checkpoints(run)}
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:  # the handler has run (and put the default action back)
        if "SIGTERM received" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert sorted(done) == ["step_2", "step_4"]
    for name, files in done.items():
        if (run / "checkpoints" / name).exists():  # pruning (checkpoint.keep) may remove the oldest
            assert snapshot(run / "checkpoints" / name) == files
    newest = list_checkpoints(run)[0][0]
    assert launch_train.main([*COMMON, f"train.steps={newest + 1}", f"output_dir={run}", "checkpoint.resume=auto"]) == 0
    assert [r["step"] for r in records(run)] == list(range(1, newest + 2))


# ------------------------------------------------------------------------------------ restarts, crashes


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    """The dp=2 run that the restarted jobs must reproduce."""
    run = tmp_path_factory.mktemp("whole") / "run"
    assert run_distributed(_main, world_size=2, args=([*RESTART, f"output_dir={run}"],), timeout=240) == [0, 0]
    return losses(run)


def test_torchrun_restarts_resume_exactly(tmp_path, uninterrupted):
    """`torchrun --max-restarts=2`, two failures in a row on one launch (by the fault hook, so that each lands
    where it must on any machine):
    - rank 1 is killed with SIGKILL in step 8, between step_5 and step_10: torchrun restarts both, and they
      continue from step_5 by themselves;
    - in that second attempt, rank 1 is killed after writing its part of step_10 (asynchronously), before the
      checkpoint is complete: the next restart ignores the partial write and continues from step_5 again.
    Every loss equals the uninterrupted run's, and the checkpoints are the complete ones."""
    run = tmp_path / "run"
    faults = "kill:step=8:rank=1;kill_in_checkpoint:step=10:rank=1:attempt=1"
    proc = torchrun([*RESTART, f"output_dir={run}", "checkpoint.async_save=true"], env_with(HAILLM_FAULT=faults),
                    restarts=2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert len(re.findall(r"exitcode\W+-9", output)) == 2, output[-3000:]
    assert output.count("resumed from step 5") == 2, output[-3000:]  # rank 0 logs it, after each restart
    assert "removing" in output and ".tmp_step_10" in output
    assert losses(run) == uninterrupted
    assert [step for step, _ in list_checkpoints(run)] == [14, 10, 5]


# --------------------------------------------------------------------------------------- hang protection


def test_stalled_rank_is_named_within_the_timeout(tmp_path):
    """Rank 1 sleeps in step 3 (for an hour): both ranks exit with code 4 and an error naming rank 1 and where it
    is, within what the watchdog guarantees after the last progress: train.collective_timeout_s, a poll of its
    thread (1 s at most) and the diagnosis round's patience."""
    run = tmp_path / "run"
    argv = [*COMMON, "parallel.dp=2", "train.steps=20", f"output_dir={run}", "train.collective_timeout_s=5"]
    results = run_ranks(argv, 2, tmp_path, HAILLM_FAULT="stall:step=3:rank=1")
    # metrics.jsonl was last written after step 2, before either rank began step 3 (its last progress)
    elapsed = time.time() - (run / "metrics.jsonl").stat().st_mtime
    for code, err in results:
        assert code == 4, err[-2000:]
        [line] = error_lines(err)
        assert "rank 1 is behind: ranks [0] wait for it" in line and "step 3 in faults.py" in line, line
    assert [r["step"] for r in records(run)] == [1, 2]
    assert elapsed < 5 + 1 + patience(5), elapsed


def test_holdups_from_collectives_and_transfers():
    def status(seqs: dict, send: dict | None = None, recv: dict | None = None) -> dict:
        return {"seqs": seqs, "p2p": {"send": send or {}, "recv": recv or {}}}

    # Rank 2 has issued fewer collectives on the world group; rank 3 never answered.
    assert holdups({0: status({"0": 5}), 1: status({"0": 5}), 2: status({"0": 4})}, 4) == ([3], {2: [0, 1]})
    # Equal collective counts; rank 0 posted a send and a receive that rank 1 has not matched (JSON: str peers).
    pipeline = {0: status({"0": 9}, {"1": 7}, {"1": 7}), 1: status({"0": 9}, {"0": 6}, {"0": 6})}
    assert holdups(pipeline, 2) == ([], {1: [0]})
    assert holdups({0: status({"0": 9}, {"1": 6}, {"1": 6}), 1: pipeline[1]}, 2) == ([], {})  # all matched


def _slow_on_rank1(fn, seconds: float):
    def slow(*args, **kwargs):
        if dist.get_rank() == 1:
            time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


def test_evaluation_and_checkpoint_save_are_progress(tmp_path, monkeypatch):
    """Rank 1 evaluates and then writes its checkpoint slowly (2.5 s each, rank 0 waiting in their collectives):
    each is within train.collective_timeout_s=4, together they are not, yet neither is a hang."""
    monkeypatch.setattr(Evaluator, "run", _slow_on_rank1(Evaluator.run, 2.5))  # the forked ranks inherit these
    monkeypatch.setattr(checkpoint, "save", _slow_on_rank1(checkpoint.save, 2.5))
    argv = [*COMMON, "parallel.dp=2", "train.steps=2", f"output_dir={tmp_path / 'run'}", "train.eval_interval=2",
            "data.eval_holdout=0.1", "checkpoint.interval=2", "train.collective_timeout_s=4"]
    results = run_ranks(argv, 2, tmp_path, timeout=60)
    assert [code for code, _ in results] == [0, 0], results[1][1][-2000:]


def _rounds() -> tuple[str | None, str | None]:
    watchdog = Watchdog(timeout_s=4, slow_factor=0)
    first = watchdog.diagnose("first", blame_required=True)  # both ranks at once: nobody is behind
    dist.all_reduce(torch.ones(1))  # both go on: the statuses of the first round are out of date
    if dist.get_rank() == 0:
        return first, watchdog.diagnose("second", blame_required=True)
    deadline = time.monotonic() + patience(4)
    while time.monotonic() < deadline:  # what the watchdog thread of a rank without progress does
        watchdog._answer()
        time.sleep(0.05)
    return first, None


def test_a_round_reads_no_status_of_an_earlier_one():
    """A diagnosis round that blamed nobody leaves statuses in the store; a later round on the same step must
    not read them (rank 1's would show it one collective behind), but the fresh answers."""
    assert run_distributed(_rounds, world_size=2, timeout=60) == [(None, None), (None, None)]


def test_the_watchdog_thread_ends_with_its_context():
    """The watchdog thread holds what `p2p` reaches (the pipeline runtime and its process groups). It must be
    gone when training ends: left to finish on its own, it could drop the last reference to a process group
    during interpreter shutdown, which aborts the process (pp=4 runs ended with SIGABRT after their last
    step). Without the join, the thread was still alive here in every one of 200 tries."""
    class Runtime:
        def p2p_posted(self) -> dict:
            return {}

    for _ in range(20):
        with Watchdog(600.0, 0.0, p2p=Runtime().p2p_posted) as watchdog:
            pass
        assert not watchdog._thread.is_alive()


def test_stalled_pipeline_rank_is_named(tmp_path):
    """pp=2 with 1F1B on 2 ranks (the pp group is the default group): rank 1 sleeps in step 3, rank 0 waits for
    its transfers; both exit with code 4 naming rank 1, from the transfers each has posted."""
    run = tmp_path / "run"
    argv = [*COMMON, "parallel.pp=2", "parallel.pp_schedule=1f1b", "train.micro_batch_size=1", "train.steps=20",
            f"output_dir={run}", "train.collective_timeout_s=5"]
    results = run_ranks(argv, 2, tmp_path, timeout=60, HAILLM_FAULT="stall:step=3:rank=1")
    for code, err in results:
        assert code == 4, err[-2000:]
        [line] = error_lines(err)
        assert "rank 1 is behind: ranks [0] wait for it" in line and "step 3 in faults.py" in line, line
    assert [r["step"] for r in records(run)] == [1, 2]


def test_dead_rank_is_named(tmp_path):
    """Rank 1 is killed in step 3: rank 0's collective fails and it exits with code 4 naming rank 1."""
    run = tmp_path / "run"
    argv = [*COMMON, "parallel.dp=2", "train.steps=20", f"output_dir={run}", "train.collective_timeout_s=5"]
    (code0, err0), (code1, _) = run_ranks(argv, 2, tmp_path, HAILLM_FAULT="kill:step=3:rank=1")
    assert code1 == -signal.SIGKILL and code0 == 4, err0[-2000:]
    [line] = error_lines(err0)
    assert "a collective failed on rank 0" in line and "rank 1 did not answer" in line, line


def _group_timeouts(argv: list[str]) -> list[float]:
    """Train as `argv` says, then the timeout of every process group this rank belongs to, but the default
    group (the test harness made it; `init_distributed` gives it the configured timeout)."""
    rank, world, device = launch_train.init_distributed()
    cfg = compose_config(argv)
    validate(cfg, world)
    launch_train.run(cfg, rank, world, device)
    return [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for pg in dist.distributed_c10d._world.pg_map if pg is not dist.GroupMember.WORLD]


def test_every_group_carries_the_configured_timeout(tmp_path):
    """pp2 (DualPipe: the mirror's partner group) x dp2 x ep2, asynchronous checkpoints (their own group): every
    group gets train.collective_timeout_s, not the backend's default (30 min on gloo, 10 on NCCL): the ten
    of the mesh (pp, edp, ep, cp, tp, and the flattened dp, dp_cp, edp_cp, dp_cp_tp, edp_cp_tp), the pipeline's
    two point-to-point groups (one per direction of the link), DualPipe's partner and the checkpoint writer's."""
    argv = [*COMMON, f"output_dir={tmp_path / 'run'}", "train.steps=1", "train.micro_batch_size=1",
            "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",
            "checkpoint.async_save=true", "train.collective_timeout_s=7"]
    for timeouts in run_distributed(_group_timeouts, world_size=4, args=(argv,), timeout=120):
        assert timeouts == [7.0] * 14, timeouts


RESET = "[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2193: Connection reset by peer"


def test_comm_failures_are_told_from_bugs():
    assert is_comm_failure(RuntimeError(RESET)) and is_comm_failure(dist.DistNetworkError("connection refused"))
    assert is_comm_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                        "waiting 5000ms for recv operation to complete"))
    assert not is_comm_failure(RuntimeError("the gloo config timed out"))  # words alone are not a collective's
    assert not is_comm_failure(ValueError(RESET))


def test_peer_failure_outside_training_is_one_line(monkeypatch, capsys):
    """A rank dies while the others resume (or build groups, load a checkpoint...): exit code 4 and one line,
    not a traceback; any other error stays a traceback (a bug)."""
    def fails(error: Exception):
        def run(*args):
            raise error
        return run

    monkeypatch.setattr(launch_train, "run", fails(RuntimeError(RESET)))
    assert launch_train.main(list(COMMON)) == 4
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("haillm:")]
    assert line.startswith("haillm: error: a collective failed on rank 0 outside the training loop") and RESET in line
    monkeypatch.setattr(launch_train, "run", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        launch_train.main(list(COMMON))


@pytest.mark.parametrize("spec", ["stall:step=3:rank1", "stall:rank=1", "wedge:step=3", "stall:step=3:step=4",
                                  "stall:step=3:when=4"])
def test_bad_fault_spec_is_the_usage_line(monkeypatch, spec):
    monkeypatch.setenv("HAILLM_FAULT", spec)
    usage = rf"^HAILLM_FAULT='{spec}': expected <stall\|sigterm\|kill\|kill_in_checkpoint>:step=<N>"
    with pytest.raises(ValueError, match=usage):
        faults.inject("step", 3)


def _killed_during_a_write(marker: Path) -> None:
    """A rank whose checkpoint write (slowed down) is in flight when its kill fault fires."""
    def write() -> None:
        time.sleep(0.5)
        marker.write_text("committed")

    threading.Thread(target=write, name=checkpoint.WRITER_THREAD).start()
    faults.inject("step", 8)


def test_kill_fault_waits_for_the_checkpoint_in_flight(monkeypatch, tmp_path):
    """A `kill` lands between two committed checkpoints, however slow the background write (a loaded machine
    once let step 8's kill overtake step 5's write, and the restart found no checkpoint to resume)."""
    monkeypatch.setenv("HAILLM_FAULT", "kill:step=8")
    marker = tmp_path / "written"
    child = mp.get_context("fork").Process(target=_killed_during_a_write, args=(marker,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL and marker.read_text() == "committed"


def test_slow_step_logs_every_thread_stack(tmp_path, capsys, monkeypatch):
    """The stall sleeps at the start of step 6 (the watchdog judges a step against the median of at least five);
    the stacks are dumped during it as long as 1.5 x the median step plus a watchdog poll (1 s) is under the
    4 s sleep: steps of up to 2 s, over 10x this machine's, a margin for a loaded CI."""
    monkeypatch.setenv("HAILLM_FAULT", "stall:step=6:seconds=4")
    argv = [*COMMON, "train.steps=6", f"output_dir={tmp_path / 'run'}", "train.watchdog_factor=1.5"]
    assert launch_train.main(argv) == 0
    err = capsys.readouterr().err
    assert "step 6 has run" in err and "over 1.5 x the median step" in err
    assert "--- thread MainThread" in err and "in inject" in err  # the main thread's stack shows the stall


# ------------------------------------------------------------------------------------------- checksums


def test_flipped_byte_is_caught_and_old_manifests_still_load(tmp_path, capsys):
    """A byte flipped inside a tensor (same size: the manifest's sizes agree) makes resume fall back to the
    previous checkpoint; a manifest written before checksums existed (sizes only) still loads."""
    run = tmp_path / "run"
    args = [*COMMON, "train.steps=4", "checkpoint.interval=2", f"output_dir={run}", "checkpoint.resume=auto"]
    assert launch_train.main(args) == 0
    shard = next((run / "checkpoints" / "step_4").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    legacy = run / "checkpoints" / "step_2" / "manifest.json"
    manifest = json.loads(legacy.read_text())
    del manifest["crc32"]
    legacy.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert launch_train.main([*args, "train.steps=5"]) == 0
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "resumed from step 2" in err


class _NoState:
    """An optimizer with nothing to save, for checkpoints of a bare module."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_pruning_and_rewrites_keep_every_good_checkpoint(tmp_path, monkeypatch):
    """checkpoint.keep=2 after a resume went back from step 6 to step 4: writing step 5 prunes nothing newer or
    needed; rewriting step 6 replaces it whole; a crash in the middle of that rewrite leaves the old step_6,
    put back by the next resume's clean-up."""
    model = torch.nn.Linear(2, 2)

    def save(step: int) -> Path:
        return checkpoint.save(tmp_path, step, model, _NoState(), {"step": step}, keep=2)

    def steps() -> list[int]:
        return [step for step, _ in list_checkpoints(tmp_path)]

    for step in (2, 4, 6):
        save(step)
    assert steps() == [6, 4]
    save(5)
    assert steps() == [6, 5, 4]
    with torch.no_grad():
        model.weight.add_(1.0)
    done = snapshot(save(6))
    assert steps() == [6, 5] and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_5", "step_6"]
    replace = os.replace

    def crash_at_commit(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise OSError("crashed")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_at_commit)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="crashed"):
        save(6)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert steps() == [5]  # step_6 is aside, the new one half committed
    checkpoint.clean_up(tmp_path)
    assert steps() == [6, 5] and snapshot(tmp_path / "checkpoints" / "step_6") == done
    assert verify(tmp_path / "checkpoints" / "step_6") is None
