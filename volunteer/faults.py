"""Drill faults: a server that misbehaves on purpose, for tests and drills only.

`VOLUNTEER_FAULTS` (the `faults` setting) lists faults, comma-separated:

  perturb:RATE:SCALE   add noise to a RATE share of steps: each position's output vector
                       gets a random vector SCALE times its own norm long
  constant[:RATE]      answer zeros (every step, or a RATE share of them)
  stale[:RATE]         answer the session's previous step's output again (its last
                       position for every position of this step; zeros on the first)
  lie-accuse[:RATE]    accuse servers this peer checked of wrong outputs they never gave
                       (read by the checks' side, not by the server)

Training attacks (BTARD's; `volunteer.training.attacks`), on a RATE share of steps:

  sign-flip[:RATE]         send the gradient negated
  random-direction[:RATE]  send a long vector in a direction the attackers share
  label-flip[:RATE]        compute the gradient against mirrored targets (the last
                           stage: the one that sees them)
  stale:STEPS              send the gradient of STEPS steps ago (an integer above 1;
                           `stale` or `stale:RATE` up to 1 is the serving fault above
                           and one step's staleness for a trainer)
  ipm[:RATE]               inner-product manipulation: minus a tenth of the honest mean
  alie[:RATE]              "a little is enough": the honest mean moved by z deviations
  wrong-activations[:RATE] pass noisy hidden states to the next stage (report a wrong
                           loss, on the last), while sending an honest gradient share
  wrong-input-grads[:RATE] send noisy gradients back to the stage before, share honest

A server with faults says so in its log and status: a drill must never pass for a
healthy peer by mistake. This module is the setting's grammar (no torch: the settings
read it); `volunteer.server.drill` makes a server's outputs wrong.
"""

from __future__ import annotations

import dataclasses

from volunteer.errors import SettingsError

OUTPUT_FAULTS = ("perturb", "constant", "stale")
TRAINING_ATTACKS = (
    "sign-flip", "random-direction", "label-flip", "stale", "ipm", "alie",
    "wrong-activations", "wrong-input-grads",
)  # fmt: skip
KINDS = (*OUTPUT_FAULTS, "lie-accuse", *(k for k in TRAINING_ATTACKS if k not in OUTPUT_FAULTS))


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    rate: float = 1.0
    scale: float = 0.0
    steps: int = 1
    """How old a `stale` trainer's gradient is."""

    def __str__(self) -> str:
        if self.kind == "perturb":
            return f"perturb:{self.rate:g}:{self.scale:g}"
        if self.steps > 1:
            return f"{self.kind}:{self.steps}"
        return self.kind if self.rate == 1.0 else f"{self.kind}:{self.rate:g}"


@dataclasses.dataclass(frozen=True)
class Faults:
    """The parsed `faults` setting (empty: an honest server)."""

    faults: tuple[Fault, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def __str__(self) -> str:
        return ",".join(map(str, self.faults))

    def rate_of(self, kind: str) -> float:
        """The share of occasions on which `kind` strikes (0: never)."""
        return max((fault.rate for fault in self.faults if fault.kind == kind), default=0.0)

    def training_attacks(self) -> tuple[Fault, ...]:
        """The faults a training peer acts on."""
        return tuple(fault for fault in self.faults if fault.kind in TRAINING_ATTACKS)


NO_FAULTS = Faults()
"""An honest peer's faults: none."""


def parse_faults(text: str) -> Faults:
    """The `faults` setting from its text (see the module's docstring).

    Raises:
        SettingsError: an unknown fault, or a rate or scale out of range.
    """
    faults = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, *numbers = item.split(":")
        if kind not in KINDS:
            raise SettingsError(f"unknown fault {kind!r} in {text!r}; known: {', '.join(KINDS)}")
        wanted = 2 if kind == "perturb" else 1
        if (kind == "perturb" and len(numbers) != 2) or len(numbers) > wanted:
            usage = "perturb:RATE:SCALE" if kind == "perturb" else f"{kind}[:RATE]"
            raise SettingsError(f"fault {item!r}: expected {usage}")
        try:
            values = [float(number) for number in numbers]
        except ValueError as exc:
            raise SettingsError(f"fault {item!r}: {exc}") from None
        rate, steps = (values[0] if values else 1.0), 1
        if kind == "stale" and rate > 1.0:
            if rate != int(rate) or rate > 10_000:
                raise SettingsError(f"fault {item!r}: STEPS must be a whole number up to 10000")
            rate, steps = 1.0, int(rate)
        if not 0.0 <= rate <= 1.0:
            raise SettingsError(f"fault {item!r}: RATE must be within 0 and 1")
        scale = values[1] if kind == "perturb" else 0.0
        if kind == "perturb" and not 0.0 < scale <= 1e6:
            raise SettingsError(f"fault {item!r}: SCALE must be above 0")
        faults.append(Fault(kind, rate, scale, steps))
    return Faults(tuple(faults))
