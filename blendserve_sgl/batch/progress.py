"""What the user watches: a progress bar on stderr and the summary at the end.

`Progress` counts completed and failed requests and output tokens; `render()` redraws one line
on a terminal (at most every `interval` seconds) and prints a plain line every `log_interval`
seconds when stderr is a file or a pipe, so logs stay readable. Two rates: `avg`, output tokens
of finished requests per second since the start (what the summary reports at the end), and
`now`, the engine's current decode rate when it reports one (`set_rate`): long answers still
decoding show there before they finish; requests per second and the time left at that rate.
Before the engine runs, `phase_line` reports the reading and planning phases. `RunStats` holds
the figures of one run (peak RSS of the driver and of the whole process tree included);
`summary_lines` formats them. `rss_mb` measures a process tree.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class RunStats:
    """Figures of one `blendserve run` (this invocation; `skipped` were done by an earlier one)."""

    requests: int = 0  # lines in the input (non-blank)
    skipped: int = 0  # already in the results file
    kept_errors: int = 0  # of `skipped`: error records of earlier runs, kept as done
    completed: int = 0
    failed: int = 0  # invalid lines + engine failures, this run
    invalid: int = 0  # of `failed`: rejected before the engine
    input_tokens: int = 0  # prompt tokens of requests completed this run
    cached_tokens: int = 0  # of those, served from SGLang's prefix cache
    output_tokens: int = 0
    engine_start_seconds: float = 0.0
    generate_seconds: float = 0.0  # first submission to last result
    wall_seconds: float = 0.0  # the whole command
    policy: str = ""
    model: str = ""
    device: str = ""
    interrupted: bool = False
    policy_stats: dict = field(default_factory=dict)
    read_seconds: float = 0.0  # read + validate + tokenize the whole input
    plan_seconds: float = 0.0  # the global order over it
    window: int | None = None  # requests in the engine at once (0: all; None: no engine ran)
    first_result_seconds: float | None = None  # engine up to the first result
    driver_peak_rss_mb: float = 0.0
    tree_peak_rss_mb: float = 0.0  # driver + engine processes, sampled while generating
    engine_restarts: int = 0  # engines started again after one of their processes died (`runner.Hunt`)

    def sample_rss(self) -> None:
        self.driver_peak_rss_mb = max(self.driver_peak_rss_mb, peak_rss_mb())
        self.tree_peak_rss_mb = max(self.tree_peak_rss_mb, rss_mb(os.getpid()))

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        t = self.generate_seconds
        return (self.input_tokens + self.output_tokens) / t if t > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(cache_hit_ratio=round(self.cache_hit_ratio, 4), output_tokens_per_s=round(self.output_tokens_per_s, 2),
                 total_tokens_per_s=round(self.total_tokens_per_s, 2),
                 requests_per_s=round(self.completed / self.generate_seconds, 3) if self.generate_seconds else 0.0)
        for k in ("engine_start_seconds", "generate_seconds", "wall_seconds", "read_seconds", "plan_seconds",
                  "driver_peak_rss_mb", "tree_peak_rss_mb"):
            d[k] = round(d[k], 3)
        if d["first_result_seconds"] is not None:
            d["first_result_seconds"] = round(d["first_result_seconds"], 3)
        return d


def count(n: int, noun: str) -> str:
    """'1 request', '2,000 requests'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def summary_lines(s: RunStats, results: str, errors: str | None) -> list[str]:
    done_before = f", {s.skipped:,} already done before" if s.skipped else ""
    head = "interrupted" if s.interrupted else "done"
    lines = [
        f"{head}: {s.requests:,} requests: {s.completed:,} completed, {s.failed:,} failed "
        f"({s.invalid:,} rejected before the engine){done_before}",
        f"  model           {s.model} on {s.device or '-'}, policy {s.policy}",
        f"  input tokens    {s.input_tokens:,} ({s.cache_hit_ratio:.1%} from the prefix cache)",
        f"  output tokens   {s.output_tokens:,}",
        f"  wall time       {s.wall_seconds:.1f} s (reading {s.read_seconds:.1f} s, planning {s.plan_seconds:.1f} s, "
        f"engine start {s.engine_start_seconds:.1f} s, generation {s.generate_seconds:.1f} s)",
        f"  throughput      {s.output_tokens_per_s:,.1f} output tok/s, {s.total_tokens_per_s:,.1f} total tok/s, "
        f"{(s.completed / s.generate_seconds if s.generate_seconds else 0):.2f} requests/s",
        f"  memory          peak RSS {s.driver_peak_rss_mb:,.0f} MB driver; with the engine processes at least "
        f"{max(s.tree_peak_rss_mb, s.driver_peak_rss_mb):,.0f} MB (the tree sampled while generating, the reader's "
        f"workers apart)" + ("" if s.window is None else "; window all requests" if not s.window else
                             f"; window {s.window:,} requests"),
        f"  results         {results}" + (f" (failed requests also in {errors})" if errors else ""),
    ]
    if s.policy_stats.get("steps"):
        ps = s.policy_stats
        over = f" over {ps['replicas']} replicas" if ps.get("replicas") else ""
        lines.insert(-1, f"  blend planning  {count(ps['steps'], 'step')}{over}, {ps.get('planning_ms_per_step', 0):.2f} "
                         "ms per step")
    if s.engine_restarts:
        times = "once" if s.engine_restarts == 1 else f"{s.engine_restarts:,} times"
        lines.insert(-1, f"  engine          started again {times} after one of its processes failed (its requests "
                         "in flight run again apart, to find the one that stops it)")
    if s.interrupted:
        lines.append("  run the same command again to finish the rest (results written so far are kept)")
    if s.failed or s.kept_errors:
        kept = f" ({s.kept_errors:,} kept from earlier runs)" if s.kept_errors else ""
        lines.append(f"  retry           {s.failed + s.kept_errors:,} error records{kept}: fix their cause, then rerun "
                     "with --retry-failed to run those requests again")
    return lines


SUMMED_STATS = ("steps", "reindexes", "planning_seconds", "insert_seconds", "waiting", "running", "handed_out",
                "sample_size", "splits")


def combine_policy_stats(parts: list) -> dict:
    """One summary of the blend policy's counters written by each replica (a DP rank or a Ray
    replica; {} where one wrote none): the counts and seconds summed, the planning time per step
    over every step, each replica's own under `per_replica`. One replica's are its own."""
    found = [p for p in parts if p]
    if not found or len(parts) == 1:
        return dict(found[0]) if found else {}
    out = {k: v for k, v in found[0].items() if k not in SUMMED_STATS and k != "dp_rank"}
    for key in SUMMED_STATS:
        values = [p[key] for p in found if isinstance(p.get(key), (int, float))]
        out[key] = sum(values) if values else None
    out["planning_ms_per_step"] = round(1e3 * out["planning_seconds"] / out["steps"], 4) if out["steps"] else 0.0
    out["replicas"], out["per_replica"] = len(parts), list(parts)
    return out


class Progress:
    """A one-line progress display for `total` requests (see module doc)."""

    def __init__(self, total: int, stream=None, interval: float = 0.5, log_interval: float = 10.0,
                 clock=time.monotonic):
        self.total = total
        self.rate: float | None = None  # the engine's current decode tokens/s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.clock = clock
        self.start = clock()
        self.completed = self.failed = self.output_tokens = 0
        self._last = -float("inf")
        self._drawn = False

    def add(self, *, completed: int = 0, failed: int = 0, output_tokens: int = 0) -> None:
        self.completed += completed
        self.failed += failed
        self.output_tokens += output_tokens
        self.render()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def line(self, width: int = 24) -> str:
        done = self.completed + self.failed
        frac = done / self.total if self.total else 1.0
        fill = int(round(frac * width))
        elapsed = self.clock() - self.start
        avg = self.output_tokens / elapsed if elapsed > 0 else 0.0
        now = f", {self.rate:,.1f} now" if self.rate is not None and done < self.total else ""
        per_s = done / elapsed if elapsed > 0 else 0.0
        eta = f" | ETA {_clock((self.total - done) / per_s)}" if per_s > 0 and done < self.total else ""
        return (f"generating [{'#' * fill}{'.' * (width - fill)}] {done:,}/{self.total:,} | {self.completed:,} "
                f"completed, {self.failed:,} failed | {per_s:,.1f} req/s, output {avg:,.1f} tok/s avg{now} | "
                f"{_clock(elapsed)}{eta}")

    def render(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.render(force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def phase_line(phase: str, count: int, unit: str, seconds: float) -> str:
    """One line for the phases before the engine: `reading: 120,000 lines (8,000/s) | 00:15`."""
    rate = f" ({count / seconds:,.0f}/s)" if seconds > 0 else ""
    return f"{phase}: {count:,} {unit}{rate} | {_clock(seconds)} | peak RSS {peak_rss_mb():,.0f} MB"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def rss_mb(pid: int) -> float:
    """Current resident memory of process `pid` and all its descendants, MB (0 without psutil)."""
    try:
        import psutil

        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except Exception:  # noqa: BLE001 (psutil missing, or the process is gone)
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except Exception:  # noqa: BLE001 (a child exited meanwhile)
            pass
    return total / 2**20
