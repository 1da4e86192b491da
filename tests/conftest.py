"""Shared pytest setup: make `blendserve_sgl` importable when pytest runs from any directory,
the tiny model the engine tests share, and register a fast hypothesis profile so the whole suite stays within about a minute."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random-weight Llama model directory (`scripts/cpu_smoke.py`), written once per session."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from cpu_smoke import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


settings.register_profile(
    "suite", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True, database=None, print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture(autouse=True)
def no_engine_watch_left():
    """No test leaves an engine watch running: one left behind watches this process's later
    children and, once a real engine in a later test ends, signals SIGQUIT to this process (a
    CI run ended so, "make: *** Quit": `generate` cut short twice left its coroutine, and with
    it the watch, pending)."""
    import threading

    yield
    left = [t for t in threading.enumerate() if t.name == "engine-watch" and t.is_alive()]
    assert not left, f"{len(left)} engine watch thread(s) still running after the test"
