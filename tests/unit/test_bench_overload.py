"""The overload benchmark's bookkeeping without Ray: scraped /metrics text -> per-interval
series -> a PNG; the per-mode counts that decide its goal."""

from __future__ import annotations

import pytest

from pipelines.bench.serve_overload import ModeResult, OverloadBenchResult, render_overload
from pipelines.bench.serve_scrape import parse, plot, series

TEXT = """# TYPE ray_mova_requests_total counter
ray_mova_requests_total{{status="200",Replica="a",application="mova"}} {ok_a}
ray_mova_requests_total{{status="200",Replica="b",application="mova"}} {ok_b}
ray_mova_requests_total{{status="503",Replica="a",application="mova"}} {refused}
# TYPE ray_mova_expert_routed_total counter
ray_mova_expert_routed_total{{expert="sam",source="routed"}} {sam}
# TYPE ray_mova_queue_depth gauge
ray_mova_queue_depth{{stage="decode"}} {queued}
# TYPE ray_mova_batch_size histogram
ray_mova_batch_size_bucket{{stage="decode",le="+Inf"}} {batches}
ray_mova_batch_size_sum{{stage="decode"}} {rows}
ray_mova_batch_size_count{{stage="decode"}} {batches}
# TYPE ray_mova_feature_cache_lookups_total counter
ray_mova_feature_cache_lookups_total{{expert="sam",result="hit"}} {hits}
ray_mova_feature_cache_lookups_total{{expert="sam",result="miss"}} {misses}
"""


def _sample(**values):
    return parse(TEXT.format(**values))


def test_scraped_counters_become_rates_and_histograms_means(tmp_path):
    first = _sample(ok_a=1, ok_b=1, refused=0, sam=2, queued=3, batches=2, rows=4, hits=0,
                    misses=2)
    second = _sample(ok_a=5, ok_b=3, refused=4, sam=8, queued=1, batches=4, rows=16, hits=3,
                     misses=3)
    assert first[("mova_requests_total", (("status", "200"),))] == 2  # summed over replicas
    panels = series([(0.0, first), (2.0, second)])
    assert panels["requests/s by status"] == {"200": [(2.0, 3.0)], "503": [(2.0, 2.0)]}
    assert panels["routed requests/s by expert"] == {"sam": [(2.0, 3.0)]}
    assert panels["queue depth by stage"]["decode"] == [(0.0, 3.0), (2.0, 1.0)]
    assert panels["mean batch size by stage"]["decode"] == [(2.0, 6.0)]  # 12 rows / 2 batches
    assert panels["feature cache hit rate"]["hit rate"] == [(2.0, 0.75)]
    png = plot(panels, tmp_path / "m.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_goal_counts_every_way_a_request_can_fail_its_user():
    clean = ModeResult("on", 10.0, [("200", 1.0, 4.0), ("503", 0.2, 20.0), ("400", 0.1, 4.0)])
    assert clean.summary() | {"ok_p50_s": None, "ok_p95_s": None} == {
        "requests": 3, "ok": 1, "refused": 1, "timed_out": 0, "stream_errors": 0, "other": 0,
        "past_deadline": 0, "slow_refusals": 0, "goodput_per_s": 0.1, "ok_p50_s": None,
        "ok_p95_s": None, "stopped_replicas": 0}
    result = OverloadBenchResult(machine={"cpu": "x"}, settings={
        "seconds": 10, "warm_s": 2, "clients": 16, "hogs": 2, "seed": 0})
    result.modes["on"] = clean.summary()
    assert "**met**" in render_overload(result)
    for bad in ([("408", 4.1, 4.0)], [("200", 4.5, 4.0)], [("503", 2.5, 20.0)],
                [("stream_error", 1.0, 4.0)], [("transport:ConnectError", 0.0, 4.0)]):
        result.modes["on"] = ModeResult("on", 10.0, bad).summary()
        assert "**missed**" in render_overload(result), bad
    stopped = ModeResult("on", 10.0, [("200", 1.0, 4.0)], stopped_replicas=1)
    result.modes["on"] = stopped.summary()
    assert "**missed**" in render_overload(result)


@pytest.mark.parametrize("records", [[], [("503", 0.1, 4.0)]])
def test_no_answer_no_latency(records):
    summary = ModeResult("off", 5.0, records).summary()
    assert summary["ok"] == 0 and summary["ok_p50_s"] is None and summary["goodput_per_s"] == 0
