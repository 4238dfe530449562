"""A hospital's privacy accounting: exact, cumulative, calibrated for the real steps.

The accountant history is a list of ``(noise_multiplier, sample_rate, steps)`` entries,
exactly Opacus' ``RDPAccountant.history``. It is kept across rounds (in the ClientApp's
``Context.state``) and, with the ledger, across runs, so ε is the RDP composition of
everything the site ever released, never a sum of rounded per-round values.

Noise is calibrated once per run for the steps the run will actually take (rounds x
local steps) on top of what the site already spent, so that the whole run ends at (not
above) the site's budget. Before each round the site checks that the round's steps keep
it within budget and refuses otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opacus.accountants import RDPAccountant

History = list[tuple[float, float, int]]

#: RDP orders: Opacus' defaults extended to large orders, which the strongly noised,
#: few-step regimes of small hospitals need for a tight bound (Opacus warns otherwise).
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 768, 1024]

#: Relative slack for float noise in calibration (bisection tolerance), not a loophole:
#: calibration aims at 0.999 of the budget so the check never trips on rounding.
_CALIBRATION_TARGET = 0.999


def epsilon(history: History, delta: float) -> float:
    """ε of the composed history at δ (RDP accountant, Opacus' default orders)."""
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta, alphas=ALPHAS))


def calibrate_noise(prior: History, sample_rate: float, steps: int, target_epsilon: float,
                    delta: float) -> float:
    """Smallest noise multiplier whose ``steps`` on top of ``prior`` stay within target."""
    goal = target_epsilon * _CALIBRATION_TARGET
    if epsilon(prior, delta) >= goal:
        raise ValueError("budget already spent")

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta)

    lo, hi = 0.0, 1.0
    while eps_at(hi) > goal:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no noise multiplier reaches the budget")
    for _ in range(60):
        mid = (lo + hi) / 2
        if eps_at(mid) > goal:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    return hi


@dataclass
class PrivacyState:
    """What a site carries between rounds of one run (serialised in Context.state)."""

    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    planned_steps: int = 0
    history: History = field(default_factory=list)

    def to_record(self) -> dict[str, object]:
        return {
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate,
            "planned-steps": self.planned_steps,
            "history-sigma": [h[0] for h in self.history],
            "history-q": [h[1] for h in self.history],
            "history-steps": [h[2] for h in self.history],
        }

    @classmethod
    def from_record(cls, rec: dict[str, object]) -> "PrivacyState":
        sig = list(rec.get("history-sigma", []))  # type: ignore[arg-type]
        q = list(rec.get("history-q", []))  # type: ignore[arg-type]
        n = list(rec.get("history-steps", []))  # type: ignore[arg-type]
        return cls(
            noise_multiplier=float(rec["noise-multiplier"]),  # type: ignore[arg-type]
            sample_rate=float(rec["sample-rate"]),  # type: ignore[arg-type]
            planned_steps=int(rec["planned-steps"]),  # type: ignore[arg-type]
            history=[(float(a), float(b), int(c)) for a, b, c in zip(sig, q, n)],
        )


def round_would_exceed(prior: History, state: PrivacyState, steps: int, budget: float,
                       delta: float) -> tuple[bool, float]:
    """Whether this round's steps push ε over budget; also the ε it would reach."""
    after = epsilon(prior + state.history + [(state.noise_multiplier, state.sample_rate, steps)], delta)
    return (after > budget * (1 + 1e-9)) or math.isnan(after), after
