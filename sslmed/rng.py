"""Positional randomness: a training step's random draws are a pure function of where it stands.

Every random draw inside a step (masks, noise, device-side augmentation) comes from a generator seeded
from (train.seed, rank, step, stream), on the step's own device. A resumed run, on any device and any
world size, therefore draws exactly what the uninterrupted run drew at that step, with no RNG state
saved; distinct `stream` values give independent draws for independent consumers within one step.
"""

from __future__ import annotations

import numpy as np
import torch

# Named streams, so that two consumers in one step never share draws.
METHOD = 0  # masks, noise, and anything else a method draws
AUGMENT = 1  # device-side augmentation parameters


def step_seed(seed: int, rank: int, step: int, stream: int = METHOD, micro_step: int = 0) -> int:
    """A 63-bit seed mixed from the step's position (numpy's SeedSequence: well-spread, stable)."""
    words = [int(seed) & 0xFFFFFFFF, int(rank), int(step), int(stream), int(micro_step)]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu",
                   stream: int = METHOD, micro_step: int = 0) -> torch.Generator:
    """A fresh `torch.Generator` on `device`, seeded by `step_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, step, stream, micro_step))
    return generator
