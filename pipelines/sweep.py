"""Which way each denoising step sweeps the frames, and in what batches.

Direction schedule
------------------
``direction="bidirectional"`` alternates forward (frame 0 -> F-1) and backward sweeps; ``start`` says
which comes first. ``passes`` is the number of direction *blocks* in the schedule: the S denoising
steps are split into ``passes`` contiguous, nearly equal blocks and the direction flips between
blocks. ``passes=0`` (the default, StableVSR's schedule) means one block per step, i.e. the
direction flips every step. ``passes=1`` is a single direction throughout. ``"forward"`` and
``"backward"`` are one-way schedules for ablations.

Chains
------
The exact sweep is one chain: frame i waits for frame i-1's x0 of the same step. With
``chain_length=L < F`` the clip is split into chains of about L consecutive frames that run in
lockstep, one batched model call per position along the chain. A chain's first frame aligns to
the neighbouring chain's x0 from the *previous* step (the current one does not exist yet), and
the chain boundaries shift by ``L // 2`` every step so that no seam stays in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["bidirectional", "forward", "backward"]
FORWARD, BACKWARD = 1, -1


def step_directions(num_steps: int, direction: Direction = "bidirectional", passes: int = 0,
                    start: Literal["forward", "backward"] = "forward") -> list[int]:
    """+1 (forward) or -1 (backward) for each of ``num_steps`` denoising steps."""
    if direction not in ("bidirectional", "forward", "backward"):
        raise ValueError(f"direction must be bidirectional, forward or backward, not {direction!r}")
    if passes < 0:
        raise ValueError(f"passes must be >= 0 (0 = flip every step), not {passes}")
    if direction == "forward":
        return [FORWARD] * num_steps
    if direction == "backward":
        return [BACKWARD] * num_steps
    first = FORWARD if start == "forward" else BACKWARD
    blocks = num_steps if passes == 0 else min(passes, num_steps)
    # step s belongs to block floor(s * blocks / num_steps); even blocks go the first way
    return [first if (s * blocks // max(num_steps, 1)) % 2 == 0 else -first for s in range(num_steps)]


@dataclass(frozen=True)
class Visit:
    """One frame's turn in a sweep.

    ``neighbour`` is the frame whose x0 this frame aligns to (None: no alignment), and ``fresh``
    says whether that x0 comes from the current step (True) or the previous step (False).
    """

    frame: int
    neighbour: int | None
    fresh: bool


def chain_starts(num_frames: int, chain_length: int, step: int) -> list[int]:
    """First frame of each chain at this step (boundaries shift by L//2 each step; L >= F: one chain)."""
    if chain_length >= num_frames:
        return [0]
    shift = (step * max(chain_length // 2, 1)) % chain_length
    starts = list(range(shift, num_frames, chain_length))
    return [0] + starts if starts[0] != 0 else starts


def plan_sweep(num_frames: int, direction: int, chain_length: int | None = None, step: int = 0,
               align: bool = True) -> list[list[Visit]]:
    """The sweep of one step as positions; each position is a list of visits run as one batch.

    ``chain_length=None`` (or >= F) is the exact sweep: F positions of one frame each. With
    ``align=False`` all frames are independent and form a single position.
    """
    if not align:
        return [[Visit(f, None, False) for f in range(num_frames)]]
    L = num_frames if chain_length is None else chain_length
    if L < 1:
        raise ValueError(f"chain_length must be >= 1, not {L}")
    starts = chain_starts(num_frames, L, step)
    chains = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [num_frames])]
    if direction == BACKWARD:
        chains = [c[::-1] for c in chains]
    positions: list[list[Visit]] = []
    for pos in range(max(len(c) for c in chains)):
        batch = []
        for chain in chains:
            if pos >= len(chain):
                continue
            f = chain[pos]
            if pos > 0:
                batch.append(Visit(f, chain[pos - 1], True))
            else:
                n = f - direction  # the neighbour on the side the sweep comes from
                stale = 0 <= n < num_frames and step > 0
                batch.append(Visit(f, n if stale else None, False))
        positions.append(batch)
    return positions
