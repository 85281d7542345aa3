"""The scale of the feedback term: through the open-loop step's calibration, or its own.

A feedback sweep (:mod:`.feedback`) adds to every closed stage's open-loop update the gain
term ``−s (C_s + λ)⁻¹ Q_θx,s δx_s``. Its scale ``s`` is the open-loop step's own: ``1/κ``
with the model step, ``lr`` with the fixed step (the same metric ``κ(C + λ)`` for both
terms, as the Bellman expansion has it). That ties the gain to a calibration measured along
the open-loop direction only, which says nothing about how far the linearisation behind
``K δx`` holds. ``feedback_gain`` picks the rule:

- ``"kappa"`` (default): ``s`` as above (the gain multiplier ``β`` stays 1);
- ``"own"``: ``s = β`` times the above, with ``β`` learned from the gain's own trial. A step
  that both adapts (its trial evaluates the open-loop update ``L(θ + δ)`` on the batch) and
  sweeps (the sweep evaluates ``L(θ + δ + gain terms)`` on the same batch, with the same
  random draws) measures what the gain terms did. ``β`` doubles (up to :data:`HIGH`) when the
  sweep's loss is the lower and halves (down to :data:`LOW`) when it is not: a
  trust-region rule on the gain alone, as Levenberg–Marquardt is on the open-loop step. Other
  steps keep ``β``.

The sweep's clip (``feedback_clip``, the gain term at most that many times the open-loop
step in the held metric) applies after ``β``.
"""

from __future__ import annotations

import math

from .._errors import bad_value

FEEDBACK_GAINS: tuple[str, ...] = ("kappa", "own")
#: ``β``'s factor after a sweep that beat the open-loop trial ...
GROW = 2.0
#: ... and after one that did not.
SHRINK = 0.5
#: Bounds on ``β``: at ``LOW`` the gain terms are 1/64 of the open-loop-calibrated ones.
LOW, HIGH = 1.0 / 64.0, 8.0


class GainCalibration:
    """``β``, the multiplier of the gain terms' scale (see the module docstring).

    Args:
        mode: ``"kappa"`` (``β`` = 1 always) or ``"own"``.

    Attributes:
        scale: ``β``.
        trials: the comparisons learnt from; ``wins``: those where the sweep was lower.
    """

    def __init__(self, mode: str = "kappa"):
        if mode not in FEEDBACK_GAINS:
            raise bad_value("feedback_gain", mode, " or ".join(map(repr, FEEDBACK_GAINS)))
        self.mode = mode
        self.scale = 1.0
        self.trials = 0
        self.wins = 0

    def learn(self, open_loss: float | None, sweep_loss: float | None) -> None:
        """Adapt ``β`` to one comparison on the same batch: ``open_loss`` = ``L(θ + δ)``
        (the open-loop trial; None when the step had none), ``sweep_loss`` =
        ``L(θ + δ + gain terms)`` (None when the sweep fell back)."""
        if self.mode != "own" or open_loss is None or sweep_loss is None:
            return
        if not (math.isfinite(open_loss) and math.isfinite(sweep_loss)):
            return
        self.trials += 1
        if sweep_loss < open_loss:
            self.wins += 1
            self.scale = min(self.scale * GROW, HIGH)
        else:
            self.scale = max(self.scale * SHRINK, LOW)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "trials": self.trials, "wins": self.wins}

    def load_state_dict(self, state: dict) -> None:
        """From :meth:`state_dict` (absent in older checkpoints: ``β`` = 1, no trials)."""
        self.scale = float(state.get("scale", 1.0))
        self.trials = int(state.get("trials", 0))
        self.wins = int(state.get("wins", 0))
