"""Puts NCCL's rules (tests/nccl_rules.py) in the worker processes of a launcher test: a process started with
HAILLM_NCCL_RULES_LOG in its environment and this directory on PYTHONPATH (`nccl_rules.subprocess_env`), and
with RANK set (torchrun's workers, not its agent), installs them; when the variable names a directory, each
worker writes its log there at exit, for `nccl_rules.check_logs`."""

import os
import sys

if os.environ.get("HAILLM_NCCL_RULES_LOG") is not None and "RANK" in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nccl_rules

    nccl_rules.install(log_dir=os.environ["HAILLM_NCCL_RULES_LOG"] or None)
