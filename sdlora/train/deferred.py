"""What the training loop learns from the device only when it syncs anyway: which steps had a NaN/Inf loss or
gradient, and how long each step took (and from that, the run's speed).

Reading a GPU value on the host (`.item()`, `bool(t)`) waits for all queued work, so the host cannot prepare the
next step while the GPU runs this one. A fused AdamW skips a flagged update on the device itself (the `found_inf`
input GradScaler also uses), so the loop only needs the flags at its check points: logging, saving, and often
enough that `train.max_nonfinite_steps` still stops a run at the exact step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` tensor (fused Adam/AdamW do), so no host check is needed."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


class SkippedSteps:
    """Per-step "non-finite" flags, read from the device in one transfer per check.

    `settle()` replays the flags in order: it warns for each skipped step, counts the finite micro-batches for the
    logged mean loss, and raises through `stop(streak, step)` as soon as `limit` steps in a row were non-finite.
    """

    def __init__(self, limit: int, stop: Callable[[int, int], Exception]):
        self.limit, self.stop = limit, stop
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, flag on the device or host, micro-batches)
        self.streak = self.skipped = self.finite_micro_batches = 0

    def add(self, step: int, nonfinite: torch.Tensor, micro_batches: int) -> None:
        self.pending.append((step, nonfinite, micro_batches))

    def due(self) -> bool:
        """True once enough flags wait that the limit could be reached: settle now to stop at the right step."""
        return self.streak + len(self.pending) >= self.limit

    def settle(self) -> None:
        if not self.pending:
            return
        flags = torch.stack([flag for _, flag, _ in self.pending]).tolist()  # the one host sync
        pending, self.pending = self.pending, []
        for (step, _, micro_batches), nonfinite in zip(pending, flags):
            if not nonfinite:
                self.streak = 0
                self.finite_micro_batches += micro_batches
                continue
            self.streak += 1
            self.skipped += 1
            logger.warning(f"step {step}: non-finite loss or gradient, the update was skipped")
            if self.streak >= self.limit:
                raise self.stop(self.streak, step)


class StepClock:
    """Seconds per training step without a host sync per step.

    On a GPU, CUDA events mark each step's start and end in the stream and are read at the next check; they time
    what the GPU saw, including its idle gaps while waiting for the host. On a CPU the work is synchronous and the
    host clock is exact.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: list[float] = []
        self._open: list = []
        self._started_event: torch.cuda.Event | None = None  # on a GPU
        self._started_at = 0.0  # on a CPU

    def start(self) -> None:
        if self.cuda:
            self._started_event = torch.cuda.Event(enable_timing=True)
            self._started_event.record()
        else:
            self._started_at = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._open.append((self._started_event, end))
        else:
            self.seconds.append(time.perf_counter() - self._started_at)

    def settle(self) -> None:
        if self._open:
            self._open[-1][1].synchronize()
            self.seconds += [start.elapsed_time(end) / 1000 for start, end in self._open]
            self._open = []


WARMUP_STEPS = 3  # first steps include allocator growth, cuDNN autotuning and compilation


def speed_stats(step_seconds: list[float], images_per_step: int, device: torch.device) -> dict:
    """Throughput after warm-up and peak device memory, as written to train_stats.json and read by benchmarks."""
    timed = step_seconds[WARMUP_STEPS:] or step_seconds
    ordered = sorted(timed)
    stats = {
        "steps_timed": len(timed),
        "images_per_step": images_per_step,
        "step_s_median": ordered[len(ordered) // 2] if ordered else 0.0,
        "images_per_s": images_per_step * len(timed) / sum(timed) if timed else 0.0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
    if device.type == "cuda":
        stats["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        stats["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return stats
