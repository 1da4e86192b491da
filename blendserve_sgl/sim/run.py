"""One call per simulated run: fresh requests, a picker, the engine, a `SimResult`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..core.cost import CostModel
from ..core.preset import PRESET, BlendPreset
from .engine import Engine, EngineConfig
from .metrics import SimResult, optimal_seconds, result_from_engine, weight_bound_seconds
from .policies import make_picker, reference_tree
from .request import from_records


@dataclass(frozen=True)
class RunSpec:
    """What a run needs besides the workload and the policy."""

    cost: CostModel
    engine: EngineConfig
    known_lengths: bool = False  # True: ignore_eos with max_new_tokens = output length (SGLang's offline
    # bench); False: requests stop at EOS and carry max_tokens, blend runs its sample first
    preset: BlendPreset = PRESET  # blend's configuration (core/preset.py; ablations: PRESET.replace(...));
    # its `pacing` is not read here: pacing is the engine's (`EngineConfig.pace`, for every policy)
    seed: int = 0


class Workload:
    """Records plus what every run over them shares: the reference tree, s_o and T_o."""

    def __init__(self, records, cost: CostModel):
        self.records = list(records)
        probe = from_records(self.records)
        self.reference = reference_tree(probe, cost)
        self.density = self.reference.density(self.reference.root)
        self.sharing = self.reference.root.sharing
        self.optimal_s = optimal_seconds(probe, cost, self.sharing)
        self._probe = probe

    def weight_bound_s(self, cost: CostModel, max_running: int) -> float:
        return weight_bound_seconds(self._probe, cost, self.sharing, max_running)


def simulate(workload: Workload, policy: str, spec: RunSpec, check: bool = False,
             on_step: Callable[[Engine], None] | None = None) -> SimResult:
    """Run `policy` over the workload; `on_step(engine)` after every step (`Engine.run`)."""
    t0 = time.perf_counter()
    requests = from_records(workload.records, known=spec.known_lengths)
    picker = make_picker(policy, requests, spec.cost, seed=spec.seed, preset=spec.preset,
                         reference=workload.reference)
    engine = Engine(spec.cost, spec.engine, picker, requests).run(check=check, on_step=on_step)
    return result_from_engine(engine, policy, workload.optimal_s, time.perf_counter() - t0,
                              workload.weight_bound_s(spec.cost, spec.engine.max_running))
