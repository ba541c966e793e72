"""Training health: which steps must not update the weights (a non-finite loss or gradient norm, a loss spike).

A loss spike is a loss above `train.loss_spike_factor` times the median loss of the last
`train.loss_spike_window` steps that updated the weights. Such a step is skipped like a non-finite one (no
optimizer step, counted in `skipped_steps`; more than `train.max_skipped_steps` in a row abort the run with
a checkpoint). The inputs are the step's global loss and gradient norm, already reduced over every rank, so
all ranks take the same decision without another collective. The window is saved in checkpoints: a resumed
run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class LossHealth:
    def __init__(self, spike_factor: float, window: int):
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=window)

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """Why the step must be skipped, or None to apply it."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "non-finite loss or gradient norm"
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                return f"loss spike ({loss:.4g} > {self.spike_factor:g} x median {median:.4g})"
        return None

    def applied(self, loss: float) -> None:
        """Record the loss of a step that updated the weights."""
        self.recent.append(loss)

    def state_dict(self) -> dict:
        return {"recent_losses": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent_losses", []))
