"""The plugin's knobs: one typed table per concern of every `BLENDSERVE_*` variable (`KNOBS`
for the `blend` policy, `CASCADE_KNOBS` for the cascade attention backend).

Each knob has a name, a type, a default (the blend preset's value where it overrides the preset),
its environment variable, its `--blend-*` flag, a help text and a check. Values are parsed and
checked once, in the launching process (`--blend-*` flags by argparse, naming the flag; the
variables when SGLang's `ServerArgs` is built, naming the variable), and reach SGLang's spawned
scheduler as one object: `BlendSettings` travels on its `ServerArgs` (`SETTINGS_ATTR`). Nothing
here writes `os.environ`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

from ..core.preset import PRESET, BlendPreset
from ..core.specs import CUSTOM_HARDWARE, hardware, hardware_names

logger = logging.getLogger(__name__)
_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
SETTINGS_ATTR = "_blend_settings"  # carries BlendSettings to the scheduler on the ServerArgs (SGLang seals
# its fields once resolved, not underscore bookkeeping, which its pickling keeps)


class Knob(NamedTuple):
    name: str  # BlendSettings field
    kind: type  # int, float, bool or str
    help: str
    check: Callable[[Any], str | None] = lambda v: None  # the problem with a value, or None
    preset: str | None = None  # the BlendPreset leaf it overrides (its default is the preset's)
    default: Any = None  # for knobs that are not part of the preset
    prefix: str = "BLENDSERVE_"  # of its environment variable
    cli: bool = True  # has a `--blend-*` flag

    @property
    def var(self) -> str:
        return f"{self.prefix}{self.name.upper()}"

    @property
    def flag(self) -> str | None:
        return "--blend-" + self.name.replace("_", "-") if self.cli else None

    @property
    def default_value(self):
        return PRESET.leaf(self.preset) if self.preset else self.default

    def parse(self, raw: str, source: str):
        """`raw` as this knob's type, checked; errors name `source` (the variable or the flag)."""
        text = raw.strip()
        if self.kind is bool:
            if text.lower() not in _BOOL:
                raise ValueError(f"{source}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")
            value = _BOOL[text.lower()]
        elif self.kind is str:
            value = text
        else:
            try:
                if not text.isascii() or "_" in text:  # int() takes other scripts' digits and 1_000
                    raise ValueError(text)
                value = self.kind(text)
            except ValueError:
                raise ValueError(f"{source}={raw!r}: expected {'an integer' if self.kind is int else 'a number'}") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{source}={raw!r}: {problem}")
        return value

    def problem(self, value) -> str | None:
        if self.kind is bool and not isinstance(value, bool):
            return "expected 1 or 0"
        if self.kind is str and not isinstance(value, str):
            return "expected a string"
        if self.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return "expected a number"
        if self.kind is int and not isinstance(value, int):
            return "expected an integer"
        if isinstance(value, float) and not math.isfinite(value):
            return "expected a finite number"
        return self.check(value)


def _within(lo, hi, lo_open=False):
    def check(v):
        if v < lo or (lo_open and v == lo) or v > hi:
            return f"must be in {'(' if lo_open else '['}{lo}, {hi}]"
        return None
    return check


def _at_least(lo, hi=None):
    """At least `lo` and, given `hi`, at most `hi` (a count: at most INT32_MAX, as SGLang holds
    token counts; a digit or two too many is refused, not taken)."""
    if hi is None:
        return lambda v: None if v >= lo else f"must be >= {lo}"
    return lambda v: None if lo <= v <= hi else f"must be from {lo} to {hi:,}"


INT32_MAX = (1 << 31) - 1  # SGLang's int32 tensors: token counts, a sampling batch's top_k


def _file_to_write(ours: Callable[[bytes], bool], what: str, first_line: bool = False):
    """The check of a path the scheduler will write (empty: none): a file whose folder exists and
    takes a new file, and which, if it exists, holds `what` (`foreign`). Checked here, in the
    launching process: the scheduler would raise at its first write and end the server, or stop
    writing with only a log line, or write over another run's results."""
    def check(v):
        if not v:
            return None
        return unwritable(Path(v)) or foreign(Path(v), ours, what, first_line)
    return check


OWN_FILE_MAX_BYTES = 1 << 26  # the counters, plans and summaries written over are KBs: larger is something else


def json_object(test: Callable[[dict], bool]) -> Callable[[bytes], bool]:
    """`ours` for `foreign`: the bytes are one JSON object that passes `test`."""
    def ours(data: bytes) -> bool:
        try:
            found = json.loads(data)
        except ValueError:
            return False
        return isinstance(found, dict) and bool(test(found))
    return ours


def foreign(path: Path, ours: Callable[[bytes], bool], what: str, first_line: bool = False) -> str | None:
    """Why the existing file `path`, which a command would write over (or append to), must be
    left alone: it is a regular file, not empty, and `ours` (given its bytes, or its `first_line`)
    says it holds something other than `what`: another run's results, a batch input (a path
    mistake destroyed them). None for a new or empty file, a device or pipe, or one of ours."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    data = None
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            data = f.readline(OWN_FILE_MAX_BYTES + 1) if first_line else f.read(OWN_FILE_MAX_BYTES + 1)
    if data is not None and len(data) <= OWN_FILE_MAX_BYTES and ours(data):
        return None
    return f"holds something other than {what}, which this would {'append to' if first_line else 'replace'}; " \
           "choose another path (or remove that file)"


_HELD_PIPES: list = []  # `unwritable`'s write ends of the pipes it found read


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (a folder, a missing or read-only folder, a file
    that is not writable), or None. A device such as /dev/stdout that exists is written in place."""
    if path.is_dir():
        return "is a directory; pass the name of a file in it"
    if not path.parent.is_dir():
        return f"the folder {path.parent} does not exist; create it or choose another path"
    if path.exists():
        if not os.access(path, os.W_OK):
            return "is not writable; choose another path or change its permissions"
        if stat.S_ISFIFO(os.stat(path).st_mode):  # a pipe with no reader: the write would wait for ever
            try:
                # held open to the end of the process: closed now, it would be the pipe's last writer
                # and its reader would take the close for the end of the file before anything is written
                _HELD_PIPES.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return "is a named pipe that nothing reads (the write would wait for ever); start its reader first"
        return None
    try:  # a folder that takes no new file (read-only, /proc) is said now, not at the first write
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"cannot write in {path.parent} ({exc.strerror}); choose another path"
    return None


def check_launch(policy: str | None, attention_backends, environ=os.environ) -> None:
    """The `BLENDSERVE_*` variables a launch with this policy and these attention backends reads,
    checked in the launching process before any model loads: ValueError naming the variable; a
    warning for each set variable that nothing reads (`unread_variables`)."""
    if policy == "blend":
        BlendSettings.load(environ)
    if "cascade" in set(attention_backends):
        values = {name: knob.default_value for name, knob in CASCADE_KNOBS.items()}
        values.update(parse_environment(CASCADE_KNOBS, environ))
        check_values(CASCADE_KNOBS, SimpleNamespace(**values))
    for name, near in unread_variables(environ):
        logger.warning("%s is set, but no blendserve-sgl setting reads it%s", name,
                       f" (did you mean {near}?)" if near else "; the settings are listed in the README")


OTHER_VARIABLES = ("BLENDSERVE_MODEL_CACHE", "BLENDSERVE_DATA", "BLENDSERVE_CPU_FALLBACK", "BLENDSERVE_SKIP_ENGINE",
                   "BLENDSERVE_SPAWNER_PID")  # read elsewhere: the model cache, data, CPU kernels, tests, lifetime


def unread_variables(environ=os.environ) -> list[tuple[str, str | None]]:
    """(name, the closest variable that is read, or None) of every `BLENDSERVE_*` variable set that
    nothing reads: a misspelled one left its setting at the default without a word."""
    import difflib

    prefix = "BLENDSERVE_"
    known = [k.var for k in (*KNOBS.values(), *CASCADE_KNOBS.values())] + list(OTHER_VARIABLES)
    tails = [k.removeprefix(prefix) for k in known]  # the shared prefix would make every name look close

    def near(name: str) -> str | None:
        found = difflib.get_close_matches(name.removeprefix(prefix), tails, n=1, cutoff=0.75)
        return prefix + found[0] if found else None
    return [(name, near(name)) for name in sorted(environ) if name.startswith(prefix) and name not in known]


def keyword_settings(kwargs: dict) -> dict:
    """`sglang.Engine(..., blend_keep_sharing=0.9)`: the `--blend-*` settings as keyword arguments
    ({"blend_NAME": value}) -> {NAME: value}, each checked as its flag is (a string is parsed as the
    flag's text; a number or bool must be of the knob's type). TypeError for a name no setting has
    (naming the closest), ValueError for a bad value naming the keyword."""
    import difflib

    out = {}
    names = [f"blend_{k.name}" for k in KNOBS.values() if k.cli]
    for key, value in kwargs.items():
        knob = KNOBS.get(key.removeprefix("blend_"))
        if knob is None or not knob.cli:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
            raise TypeError(f"sglang.Engine got {key}={value!r}, which is not a blendserve-sgl setting"
                            + (f"; did you mean {near[0]}?" if near else f"; the settings are {', '.join(names)}"))
        if isinstance(value, str):
            out[knob.name] = knob.parse(value, key)
            continue
        if knob.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif knob.kind is bool and type(value) is int and value in (0, 1):
            value = bool(value)
        problem = knob.problem(value)
        if problem:
            raise ValueError(f"{key}={value!r}: {problem}")
        out[knob.name] = value
    return out


def open_in_place(path: str, mode: str = "w"):
    """`path` opened for writing as it is (a device, a pipe, a file appended to). A named pipe is
    opened without blocking: with no reader the open fails (ENXIO) and with a full pipe a write
    does (EAGAIN), an OSError the caller treats as any failed write, where a blocking open
    waited for a reader and held the scheduler for good."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else 0)
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            flags = os.O_WRONLY | os.O_NONBLOCK
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, flags, 0o644), mode if mode == "a" else "w")


def rank_path(path: str | None, dp_rank: int | None) -> str | None:
    """Where DP rank `dp_rank` writes the file a user named `path`: `NAME.dpR.EXT` (each rank plans
    its own queue; one file would hold whichever rank wrote last), `path` itself on a server of one
    rank. A device or pipe (/dev/null, /dev/stdout to a terminal) is shared as it is."""
    if not path or dp_rank is None or (os.path.exists(path) and not os.path.isfile(path)):
        return path
    head, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        return f"{path}.dp{dp_rank}"
    return f"{head}.dp{dp_rank}.{ext}"


def rank_of(scheduler) -> tuple[int | None, bool]:
    """(the data-parallel rank of this process (`scheduler`: SGLang's scheduler or model runner,
    whose `server_args` say how many ranks run) when the server runs several, else None; whether it
    writes the side files (`rank_path`): the first of its tensor- and pipeline-parallel group,
    which plans and decodes as the others do). Never raises: what SGLang cannot tell is taken as
    rank 0 of one."""
    dp_size = getattr(getattr(scheduler, "server_args", None), "dp_size", 1)
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        ranks = {name: getattr(par, name, None) for name in ("dp_rank", "attn_dp_rank", "attn_tp_rank", "tp_rank",
                                                              "pp_rank")}
    except Exception:  # noqa: BLE001 (an unpublished rank reads as rank 0)
        ranks = {}
    dp = ranks.get("dp_rank") if ranks.get("dp_rank") is not None else ranks.get("attn_dp_rank")
    tp = ranks.get("attn_tp_rank") if ranks.get("attn_tp_rank") is not None else ranks.get("tp_rank")
    first = not tp and not ranks.get("pp_rank")
    return (dp if isinstance(dp_size, int) and dp_size > 1 and isinstance(dp, int) else None), first


def read_policy_stats(path: str | None) -> dict:
    """The blend policy's counters a scheduler wrote to `path` (`write_json_file`), {} when there are none."""
    if not path:
        return {}
    try:
        found = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_json_file(path: str, data: dict, what: str) -> bool:
    """Write `data` as JSON to `path`: a regular file (or a new one) atomically, a temporary file
    renamed over its link target; anything else (a device such as /dev/stdout or /dev/null, a
    pipe) in place: renaming over it replaced the device node with a regular file. False, with a
    warning, when it cannot: these files are side outputs of the scheduler, and a failed write (a
    full disk, a folder removed mid-run) must not end it."""
    try:
        replace_whole(path, json.dumps(data))
        return True
    except OSError as exc:
        logger.warning("cannot write %s to %s (%s); it stops here", what, path, exc)
        return False


def replace_whole(path: str, text: str, open_device: Callable = open_in_place) -> None:
    """`text` as the whole of `path`: a regular file (or a new one) through a temporary file
    renamed over its link target; anything else (a device, a pipe) written in place, opened with
    `open_device(path, "w")`. Raises OSError, the temporary file removed."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        with open_device(target, "w") as f:
            f.write(text)
        return
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _hardware(v):
    if v == "auto" or v.lower() in hardware_names():
        return None
    if "=" in v or "x" in v.lower():  # an accelerator's figures, or NxNAME
        try:
            hardware(v)
        except (ValueError, OSError, OverflowError) as exc:
            return str(exc)
        return None
    return f"choose auto or one of {', '.join(hardware_names())}, or give the figures as {CUSTOM_HARDWARE}"


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("hardware", str, "Cost-model hardware preset: a100, h100, h200, h200-measured (fitted on an H200 by "
         "bench/gpu_evidence.py), cpu (this project's calibrated CPU), "
         "flops=F,bandwidth=B,memory=M (an accelerator's dense BF16 FLOP/s, bytes/s, bytes) or auto (cpu on a CPU "
         "device, else from the GPU's name; h100 with a warning for a GPU no preset names). NxNAME: N of them as "
         "one tensor-parallel engine; auto with tp_size N plans for N GPUs.", _hardware,
         default="auto"),
    Knob("sample_fraction", float, "Share of unknown-length requests run first to estimate output lengths.",
         _within(0, 1), preset="sample_fraction"),
    Knob("keep_sharing", float, "Split budget: keep at least this share of the prefix sharing.",
         _within(0, 1), preset="keep_sharing"),
    Knob("prior_output_len", int, "Output-length estimate before any sample finished.", _at_least(1, INT32_MAX),
         preset="prior"),
    Knob("hold_prefix_tokens", int, "Hold a request whose prefix of at least this many tokens is shared with a "
         "request admitted in the same step, or whose prefill SGLang has not processed yet (the overlap scheduler "
         "caches a prompt one iteration after admitting it).", _at_least(0, INT32_MAX),
         preset="hold_prefix_tokens"),
    Knob("final_wave", bool, "Once every waiting request fits in the KV cache at once, admit them longest output "
         "first so the batch ends in one wave (1/0).", preset="final_wave"),
    Knob("engine_check", bool, "Plan only what SGLang's admission check takes, in the order it walks the queue: "
         "each request charged its uncached prompt + min(max_new_tokens, clip) + 1, one chunked prompt a step and "
         "it last (1/0).", preset="engine_check"),
    Knob("pacing", bool, "Set each step's prefill-token budget and chunk size so the step's compute holds the "
         "waiting work's density against its memory time (weight read + KV read); off while nothing decodes "
         "(1/0).", preset="pacing"),
    Knob("metering", bool, "Admit each side's memory work at the rate of its memory share, counting SGLang's "
         "forward passes (1/0).", preset="metering"),
    Knob("free_pool_credit", float, "With metering: each step a side also earns this many times its part of the "
         "KV pool left free as memory-work credit (0: only its share's rate).", _within(0, 1000),
         preset="free_pool_credit"),
    Knob("seed", int, "Seed of the output-length sample.", _at_least(0, (1 << 63) - 1), preset="seed"),
    Knob("stats_path", str, "Write the policy's counters (JSON) to this file every 32 steps, at the end and once "
         "the engine drains (with several DP ranks, each to NAME.dpR.EXT).",
         _file_to_write(json_object(lambda d: d.get("policy") == "blend"), "the blend policy's counters"),
         default=""),
    Knob("trace_path", str, "Append one JSON line per step (plan, paced budget, admitted) to this file (with "
         "several DP ranks, each to NAME.dpR.EXT).",
         _file_to_write(json_object(lambda d: "step" in d and "plan" in d), "the blend policy's step trace",
                        first_line=True), default=""),
)}


# `--attention-backend cascade` (cascade_backend.CascadeSettings): variables only.
MAX_CASCADE_LEVELS = 64  # the plan holds every level each decode step: 8 requests took 29 s with 10**6 (2-core CPU)
CASCADE_KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("levels", int, "Levels of the cascade plan: shared ones + the suffix level (1 turns the cascade off; "
         f"at most {MAX_CASCADE_LEVELS}: the plan holds every level, empty or not, at every decode step).",
         _within(1, MAX_CASCADE_LEVELS), default=2, prefix="BLENDSERVE_CASCADE_", cli=False),
    Knob("min_shared_tokens", int, "A group must share at least this many tokens.", _at_least(1, INT32_MAX),
         default=16,
         prefix="BLENDSERVE_CASCADE_", cli=False),
    Knob("stats_path", str, "Rewrite decode counters there as JSON after every decode step (with several DP "
                            "ranks, or --ray replicas, each writes NAME.dpR.EXT).",
         _file_to_write(json_object(lambda d: d.get("backend") == "cascade"), "the cascade counters"),
         default="", prefix="BLENDSERVE_CASCADE_", cli=False),
)}


def parse_environment(knobs: dict[str, Knob], environ=os.environ) -> dict:
    """{name: value} for the knobs whose variables are set (and not blank); a bad value raises
    ValueError naming the variable."""
    values = {}
    for knob in knobs.values():
        raw = environ.get(knob.var)
        if raw is not None and raw.strip() != "":
            values[knob.name] = knob.parse(raw, knob.var)
    return values


def check_values(knobs: dict[str, Knob], obj) -> None:
    """Check every knob's value on a settings object; the error names the variable."""
    for name, knob in knobs.items():
        value = getattr(obj, name)
        if knob.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        problem = knob.problem(value)
        if problem:
            raise ValueError(f"{knob.var}={value!r}: {problem}")


def _default(name: str):
    return KNOBS[name].default_value


@dataclass(frozen=True, slots=True)
class BlendSettings:
    hardware: str = _default("hardware")
    sample_fraction: float = _default("sample_fraction")
    keep_sharing: float = _default("keep_sharing")
    prior_output_len: int = _default("prior_output_len")
    hold_prefix_tokens: int = _default("hold_prefix_tokens")
    final_wave: bool = _default("final_wave")
    engine_check: bool = _default("engine_check")
    pacing: bool = _default("pacing")
    metering: bool = _default("metering")
    free_pool_credit: float = _default("free_pool_credit")
    seed: int = _default("seed")
    stats_path: str = _default("stats_path")
    trace_path: str = _default("trace_path")

    def __post_init__(self) -> None:
        check_values(KNOBS, self)

    def preset(self, base: BlendPreset = PRESET) -> BlendPreset:
        """`base` with the fields these settings override."""
        return base.replace(**{k.preset: getattr(self, k.name) for k in KNOBS.values() if k.preset})

    @classmethod
    def load(cls, environ=os.environ, flags: dict | None = None) -> "BlendSettings":
        """Settings from the `BLENDSERVE_*` variables, overridden by parsed flag values
        ({name: value}); a bad variable raises ValueError naming it (one a flag overrides is not read)."""
        flags = flags or {}
        return cls(**{**parse_environment({k: v for k, v in KNOBS.items() if k not in flags}, environ), **flags})

