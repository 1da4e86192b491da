"""The README's results section is generated from bench/results/*.json, never typed by hand."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_results_match_json():
    """Fails when a result file changed and the README was not regenerated (or was edited by hand)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_result_records_its_command_and_machine():
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files, "no benchmark results committed"
    for path in files:
        data = json.loads(path.read_text())
        assert data.get("command"), f"{path.name} lacks the command that produced it"
        assert data.get("machine"), f"{path.name} lacks the machine it ran on"
