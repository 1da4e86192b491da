"""The `blend` policy's knobs: `BLENDSERVE_*` environment variables or `--blend-*` flags.

The flags of `python -m sglang.launch_server` set the environment variables (so the spawned
scheduler process sees them); `sglang.Engine` users set the variables directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from ..core.specs import hardware_names

_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

# field -> (environment variable, flag, help)
KNOBS = {
    "hardware": ("BLENDSERVE_HARDWARE", "--blend-hardware",
                 "Cost-model hardware preset: a100, h100, h200, cpu (measured here) or auto "
                 "(cpu on a CPU device, else from the GPU's name). Default: auto."),
    "sample_fraction": ("BLENDSERVE_SAMPLE_FRACTION", "--blend-sample-fraction",
                        "Share of unknown-length requests run first to estimate output lengths. Default: 0.01."),
    "keep_sharing": ("BLENDSERVE_KEEP_SHARING", "--blend-keep-sharing",
                     "Split budget: keep at least this share of the prefix sharing. Default: 0.99."),
    "prior_output_len": ("BLENDSERVE_PRIOR_OUTPUT_LEN", "--blend-prior-output-len",
                         "Output-length estimate before any sample finished. Default: 256."),
    "hold_prefix_tokens": ("BLENDSERVE_HOLD_PREFIX_TOKENS", "--blend-hold-prefix-tokens",
                           "Hold a request whose prefix of at least this many tokens is shared with a request "
                           "admitted in the same step, or whose prefill SGLang has not processed yet (the overlap "
                           "scheduler caches a prompt one iteration after admitting it). "
                           "Default: 32."),
    "final_wave": ("BLENDSERVE_FINAL_WAVE", "--blend-final-wave",
                   "Once every waiting request fits in the KV cache at once, admit them longest output first "
                   "so the batch ends in one wave (1/0). Default: 1."),
    "seed": ("BLENDSERVE_SEED", "--blend-seed", "Seed of the output-length sample. Default: 0."),
}


@dataclass(frozen=True, slots=True)
class BlendSettings:
    hardware: str = "auto"
    sample_fraction: float = 0.01
    keep_sharing: float = 0.99
    prior_output_len: int = 256
    hold_prefix_tokens: int = 32
    final_wave: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hardware != "auto" and self.hardware.lower() not in hardware_names():
            raise ValueError(f"{KNOBS['hardware'][0]}={self.hardware!r}: choose auto or one of {hardware_names()}")
        if not (0.0 <= self.sample_fraction <= 1.0):
            raise ValueError(f"{KNOBS['sample_fraction'][0]}={self.sample_fraction!r}: must be in [0, 1]")
        if not (0.0 <= self.keep_sharing <= 1.0):
            raise ValueError(f"{KNOBS['keep_sharing'][0]}={self.keep_sharing!r}: must be in [0, 1]")
        if self.prior_output_len < 1:
            raise ValueError(f"{KNOBS['prior_output_len'][0]}={self.prior_output_len!r}: must be >= 1")
        if self.hold_prefix_tokens < 0:
            raise ValueError(f"{KNOBS['hold_prefix_tokens'][0]}={self.hold_prefix_tokens!r}: must be >= 0")

    @classmethod
    def from_env(cls, environ=os.environ) -> "BlendSettings":
        values = {}
        for f in fields(cls):
            var = KNOBS[f.name][0]
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            kind = type(f.default)
            if kind is bool:
                word = raw.strip().lower()
                if word not in _BOOL:
                    raise ValueError(f"{var}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")
                values[f.name] = _BOOL[word]
                continue
            try:
                value = kind(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r}: expected a {kind.__name__}") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{var}={raw!r}: expected a finite number")
            values[f.name] = value
        return cls(**values)
