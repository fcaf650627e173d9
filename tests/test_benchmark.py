"""The benchmark keeps working: its quick mode runs every part with tiny sizes. No figure is
asserted (loopback on a shared machine says nothing about speed); what is asserted is that each
part measured what it says, and that every session and transfer succeeded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent


def quick_run(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """`benchmarks/run.py --quick` with `args`: what it printed and its JSON results."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--json", str(out), *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, json.loads(out.read_text())


def test_benchmark_quick_mode_runs_every_part(tmp_path: Path) -> None:
    stdout, results = quick_run(tmp_path)
    for case in ("RETR passive", "RETR active", "STOR passive", "STOR active"):
        for path in ("direct", "splice", "copy"):
            assert results["throughput"][case][path]["median"] > 0
    for case in ("RETR passive", "STOR passive"):
        assert results["ftps"][case]["gateway"]["median"] > 0
    assert results["setup"]["gateway"]["p90"] > 0
    for level in results["concurrency"].values():
        assert level["direct"]["successes"] == level["gateway"]["successes"] == 5
        assert level["gateway"]["peak_rss_kib"] > 0
    assert results["idle"]["30"]["logged_in"] == 30
    for path in ("direct", "minimal", "splice", "copy"):
        assert results["relay"][path]["median"] > 0  # each checked that every byte arrived
    parts = ("1. Throughput", "2. FTPS", "3. Session set-up", "4. Concurrency", "5. Idle", "6. ")
    for part in parts:
        assert part in stdout


def test_benchmark_runs_only_the_parts_and_relays_asked_for(tmp_path: Path) -> None:
    """`--parts throughput --relays splice` measures direct and spliced throughput only."""
    stdout, results = quick_run(tmp_path, "--parts", "throughput", "--relays", "splice")
    for case in ("RETR passive", "RETR active", "STOR passive", "STOR active"):
        assert set(results["throughput"][case]) == {"direct", "splice"}
        assert results["throughput"][case]["splice"]["median"] > 0
    assert not {"ftps", "setup", "concurrency", "idle", "relay"} & set(results)
    assert "1. Throughput" in stdout and "2. FTPS" not in stdout


def test_benchmark_refuses_an_unknown_part(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--parts", "throughput,speed"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "unknown part(s): speed" in run.stderr
