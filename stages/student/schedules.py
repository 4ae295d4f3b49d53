"""The released learning-rate schedules, as factors of the base learning rate per iteration.

Both are stepped once per iteration after the optimiser step (torch's LambdaLR), so iteration
`it` (0-based) trains at lr x factor(it): the very first step of a warm-up trains at lr 0, as in
the released code. The formulas are the released code's, operation for operation, in float64:
the factors agree to the last bit (the cosine is the C library's `math.cos` where the released
code calls `np.cos`; they can differ in the last bit on CPUs where numpy uses its own vector cos).
"""

from __future__ import annotations

import math

from pipeline.errors import ConfigError

SCHEDULES = ("warmup-cosine", "rsqrt-cooldown")


def warmup_cosine(it: int, warmup_end: int, max_it: int, factor_min: float) -> float:
    """CVPR (utils/scheduler.py `WarmupCosine`, both branches): it / warmup_end during the warm-up,
    then a cosine from 1 to `factor_min` (= min_lr / lr) at `max_it`."""
    if it < warmup_end:
        return it / warmup_end
    it = it - warmup_end
    span = max_it - warmup_end
    angle = (it / span) * math.pi if span > 0 else math.pi  # a warm-up as long as the run: its end
    return factor_min + 0.5 * (1 - factor_min) * (math.cos(angle) + 1)


def rsqrt_cooldown(it: int, warmup_end: int, cooldown_start: int, timescale: float, max_it: int) -> float:
    """ScaLR+ (scalr_plus: utils/scheduler.py `LinWarmup_ReciprocalSqrt_LinCoolDown`): linear
    warm-up to 1 at `warmup_end` (included), then 1 / sqrt(1 + (it - warmup_end) / timescale) up
    to `cooldown_start` (included), then a linear cool-down from 1 / sqrt(1 + cooldown_start /
    timescale) to 0 at `max_it` - 1. That base does not subtract the warm-up, as released: the
    factor jumps down a little where the cool-down starts. 0 from `max_it` on (where the released
    code also warns: the scheduler's step after the last iteration asks for it)."""
    if it <= warmup_end:
        return it / warmup_end
    if it <= cooldown_start:
        return 1 / math.sqrt(1 + (it - warmup_end) / timescale)
    if it < max_it:
        it = it - cooldown_start
        span = max_it - cooldown_start
        base = 1 / math.sqrt(1 + cooldown_start / timescale)
        return base * (span - it - 1) / (span - 1)
    return 0.0


def check_rsqrt_cooldown(warmup_end: int, cooldown_start: int, max_it: int) -> None:
    """The released schedule's own assertions, as a one-line error."""
    if not 0 < warmup_end <= cooldown_start <= max_it:
        raise ConfigError(
            f"rsqrt-cooldown schedule needs 0 < warm-up end ({warmup_end}) <= cool-down start ({cooldown_start}) "
            f"<= last iteration ({max_it}); with few steps an epoch, lower the epochs of the warm-up or cool-down"
        )
