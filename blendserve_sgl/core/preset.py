"""The blend configuration, built in one place.

`PRESET` is what the SGLang plugin ships and what the simulator's blend runs: the scanner's
`ScanConfig`, the output-length estimator, and the engine-side options the plugin supplies
(paced prefill, metered memory work). Settings (`BLENDSERVE_*` / `--blend-*`) and ablations
change it with `PRESET.replace(name=value)` (leaf field names; each names one field of one
part), which returns a new frozen preset.

KV projection (`Budget.kv_horizons`) is not part of it: SGLang's admission check reserves every
running request's remaining max_new_tokens, so the plugin cannot lend memory that running
requests reserve for later.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .estimate import OutputLengthEstimator
from .scanner import ScanConfig


@dataclass(frozen=True, slots=True)
class BlendPreset:
    scan: ScanConfig
    estimator: OutputLengthEstimator
    pacing: bool = True  # each step's prefill tokens from core/pacing.py (the waiting work's density)
    metering: bool = True  # the scanner gets the step count and pool size (memory work at the shares' rate)
    engine_ratio: bool = True  # reservations scale estimated outputs by the engine's new-token ratio (SGLang's
    # admission does so for every request); False: by ScanConfig.reserve_output_ratio

    def replace(self, **leaves) -> "BlendPreset":
        """A copy with leaf fields changed, e.g. `replace(keep_sharing=0.9, pacing=False)`."""
        parts: dict[str, dict] = {}
        for name, value in leaves.items():
            part = _LEAF_PART.get(name)
            if part is None:
                raise ValueError(f"unknown blend preset field {name!r}; known: {', '.join(sorted(_LEAF_PART))}")
            parts.setdefault(part, {})[name] = value
        own = parts.pop("", {})
        return replace(self, **own, **{part: replace(getattr(self, part), **vals) for part, vals in parts.items()})

    def leaf(self, name: str):
        """The value of one leaf field (`leaf("keep_sharing")`)."""
        part = _LEAF_PART.get(name)
        if part is None:
            raise ValueError(f"unknown blend preset field {name!r}; known: {', '.join(sorted(_LEAF_PART))}")
        return getattr(getattr(self, part) if part else self, name)


_LEAF_PART: dict[str, str] = {
    **{f.name: "scan" for f in fields(ScanConfig)},
    **{f.name: "estimator" for f in fields(OutputLengthEstimator)},
    **{f.name: "" for f in fields(BlendPreset) if f.name not in ("scan", "estimator")},
}

PRESET = BlendPreset(
    scan=ScanConfig(hold_prefix_tokens=32, fill_while_sampling=True, final_wave=True, sample_quorum=1.0,
                    lend_idle_share=True, engine_check=True, free_pool_credit=1.0),
    estimator=OutputLengthEstimator(prior=256, sample_fraction=0.01, seed=0),
)
