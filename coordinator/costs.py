"""Online refinement of cost models from heartbeats (DESIGN.md §6). Pure bookkeeping, no I/O.

A worker's start-up profile is a few probes on an idle machine; under real load its steps may run
slower (a busy host, other processes on the cores) or faster (warm caches). Every heartbeat reports
the interval's steps, their mean time, the tokens computed and the sequences scheduled, so the
coordinator can compare what the model predicted with what happened:

    prefill shapes:  observed step time vs a + b·n + c·n²  at n = tokens per step
    decode shapes:   observed step time vs base + per_seq·B at B = sequences per step (intervals in which
                     a decode worker also computed prompt tokens, prefilling locally, are left out)

The ratio observed / predicted is averaged per (model, shape) with weights by steps (an exponential
moving average over about `window` steps). Once `min_steps` steps are in and the ratio is off by more
than `tolerance`, `proposals()` returns the profile scaled by it (the shape of the curve from the
profile, its level from the fleet); the leader stores it in etcd, every replica picks it up, and the
average starts again against the new model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coordinator.policy import DecodeCost, PrefillCost


@dataclass
class _Track:
    log_ratio: float = 0.0
    weight: float = 0.0  # steps behind the average (saturates at `window`)
    steps: int = 0


class CostRefiner:
    def __init__(self, window: int = 500, min_steps: int = 50, tolerance: float = 0.15):
        self.window, self.min_steps, self.tolerance = window, min_steps, tolerance
        self.tracks: dict[tuple[str, str, str], _Track] = {}  # (model, shape, side)

    def observe(self, model: str, shape: str, role: str, steps: int, step_ms: float, tokens: int, seqs: int,
                prefill: PrefillCost, decode: DecodeCost) -> None:
        if steps <= 0 or step_ms <= 0 or role == "colocated":  # mixed steps: neither model alone explains them
            return
        if role == "prefill":
            n = tokens / steps
            if n < 1:
                return
            side, predicted = "prefill", prefill.seconds(int(round(n)))
        else:
            b = seqs / steps
            if b < 1 or tokens > seqs:  # tokens beyond one a sequence: a prompt was computed in these steps
                return  # (a decode worker prefilling locally, or covering for the prefill role): mixed
            side, predicted = "decode", decode.base + decode.per_seq * b
        if predicted <= 0:
            return
        t = self.tracks.setdefault((model, shape, side), _Track())
        r = math.log((step_ms / 1e3) / predicted)
        w = min(steps, self.window)
        t.weight = min(t.weight + w, self.window)
        t.log_ratio += (r - t.log_ratio) * (w / t.weight)
        t.steps += steps

    def proposals(self, profiles: dict[tuple[str, str], dict]) -> list[tuple[str, str, dict, dict]]:
        """[(model, shape, refined profile, ratios)] for every shape whose fleet disagrees with its
        stored profile by more than the tolerance (after enough steps); their averages restart."""
        out = []
        for (model, shape), prof in profiles.items():
            refined, ratios = dict(prof), {}
            for side in ("prefill", "decode"):
                t = self.tracks.get((model, shape, side))
                if t is None or t.steps < self.min_steps or side not in prof:
                    continue
                k = math.exp(t.log_ratio)
                if abs(k - 1.0) <= self.tolerance:
                    continue
                # the step's coefficients; a hop is not a step time
                refined[side] = {name: v if name == "hop" else v * k for name, v in prof[side].items()}
                ratios[side] = k
                del self.tracks[(model, shape, side)]
            if ratios:
                out.append((model, shape, refined, ratios))
        return out
