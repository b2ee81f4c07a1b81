"""`mova bench serve --quick` in its own process (it starts and stops its own Ray and Serve):
both sides answered every request, the table's ratios come from the measured runs, and only
its own section of the results file is replaced. Bounded: the benchmark runs in its own
process group, killed whole (its Ray included) if it outlives the limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bench_serve_quick_measures_both_sides(tmp_path):
    results = tmp_path / "benchmarks.md"
    results.write_text("# results\n\n<!-- bench:model:tiny:cpu -->\nkept\n"
                       "<!-- /bench:model:tiny:cpu -->\n")
    raw = tmp_path / "serve.json"
    exe = Path(sys.executable).parent / "mova"
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(exe), "bench", "serve", "--quick", "--concurrency", "1,4", "--max-new-tokens",
             "4", "--out", str(results), "--json", str(raw)], stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and every Ray process it began
            proc.wait(timeout=30)
            pytest.fail("mova bench serve --quick did not finish within 600 s:\n"
                        + log.read_text()[-3000:])
    assert code == 0, log.read_text()[-3000:]
    data = json.loads(raw.read_text())
    assert [r["clients"] for r in data["reference"]] == [1, 4]
    assert [r["clients"] for r in data["served"]] == [1, 4]
    for side in ("reference", "served"):
        for level in data[side]:
            assert level["errors"] == 0
            assert len(level["latencies_ms"]) == level["requests"] > 0
    # greedy decoding of the same model: the served answers equal the reference's
    assert all(r["identical"] == r["requests"] for r in data["served"])
    assert data["memory_mib"]  # per-deployment memory was read from the replicas
    text = results.read_text()
    assert "kept" in text and "<!-- bench:serve:tiny:cpu -->" in text
    ref, srv = data["reference"][1], data["served"][1]
    ratio = (srv["requests"] / srv["seconds"]) / (ref["requests"] / ref["seconds"])
    assert f"{ratio:.2f}x" in text
