"""Run budgets shared by the methods; each method states only its differences.

`paper` is a method's Config defaults (the published preset), so it has no overrides.
Budgets scale epochs, steps and batch sizes; loss weights stay as published.
"""
from __future__ import annotations

# Smallest run that still exercises every code path: two synthesis rounds per epoch
# (ep_steps // kd_steps), so inversion methods sample a pool that already holds a batch
# and CMI draws negatives from a non-empty memory bank.
SMOKE = dict(epochs=1, ep_steps=2, kd_steps=1, g_steps=2, batch_size=8, synthesis_batch_size=8)

# The embedded default on a 2-core CPU: minutes, not GPU-days.
CPU = dict(epochs=10, ep_steps=50, batch_size=128, synthesis_batch_size=128)

GENERATOR_BUDGETS = {
    "smoke": dict(SMOKE),
    "cpu": {**CPU, "kd_steps": 5, "g_steps": 1},
}


def inversion_budgets(cpu_g_steps: int, **smoke_extra) -> dict[str, dict]:
    """Inversion methods: one synthesis round per epoch on `cpu` (kd_steps = ep_steps),
    with `cpu_g_steps` optimisation steps per batch."""
    return {
        "smoke": {**SMOKE, **smoke_extra},
        "cpu": {**CPU, "kd_steps": 50, "g_steps": cpu_g_steps},
    }
