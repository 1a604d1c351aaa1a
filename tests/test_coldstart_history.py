"""Cold-start phases, per-minute history, status words and the SVG charts: pure, fake clocks."""
from __future__ import annotations

from controller.coldstart import ColdStarts
from controller.history import MinuteSeries
from controller.latency import bucket_of
from controller.policy.status import status_word
from gateway.ui.charts import history_charts, line_chart
from gateway.ui.session import Sessions


def test_a_cold_start_is_cut_into_its_phases_and_ends_at_the_first_byte():
    cs = ColdStarts()
    cs.begin("i1", "dep", "cold start", queued_since=100.0, now=100.5)
    cs.mark("i1", "placement", 100.6)
    cs.mark("i1", "create", 101.0)
    cs.mark("i1", "port", 103.0)
    cs.ready("i1", 103.5)
    live = cs.of("i1", 103.6)
    assert live["current"] == "first_byte" and live["outcome"] is None
    assert cs.first_byte("i1", 103.7) is True
    done = cs.recent_of("dep", 104.0)[0]
    assert done["outcome"] == "served"
    assert [(p["phase"], round(p["ms"])) for p in done["phases"]] == [
        ("queue", 500), ("placement", 100), ("create", 400), ("port", 2000), ("health", 500), ("first_byte", 200)]
    assert round(done["total_ms"]) == 3700
    assert round(cs.slowest_since("dep", 0), 3) == done["total_ms"]
    assert cs.first_byte("i1", 105.0) is False  # only once


def test_a_start_nobody_waited_for_ends_when_ready_and_a_failed_one_is_not_a_cold_start_time():
    cs = ColdStarts()
    cs.begin("a", "dep", "minReplicas 1", queued_since=None, now=10.0)
    cs.ready("a", 12.0)
    cs.begin("b", "dep", "minReplicas 1", queued_since=None, now=20.0)
    cs.failed("b", 25.0)
    recent = cs.recent_of("dep", 30.0)
    assert [(r["instance"], r["outcome"], r["cold"]) for r in recent] == [("b", "failed", False), ("a", "ready", False)]
    assert cs.slowest_since("dep", 0) == 2000.0
    hist = {(s["phase"]): s for s in cs.histograms()["series"]}
    assert hist["total"]["count"] == 1 and hist["total"]["cumulative"][-1] == 1
    assert hist["queue"]["count"] == 2


def test_a_waiting_request_that_never_reports_is_closed_after_a_minute():
    cs = ColdStarts()
    cs.begin("a", "dep", "cold start", queued_since=0.0, now=0.0)
    cs.ready("a", 1.0)
    cs.expire(30.0)
    assert cs.of("a", 30.0)["outcome"] is None
    cs.expire(62.0)
    assert cs.of("a", 62.0)["outcome"] == "ready"


def test_minute_series_keeps_an_hour_with_exact_percentiles():
    m = MinuteSeries()
    m.add(60.0 * 10 + 5, 90, 0, {bucket_of(10.0): 90})
    m.add(60.0 * 10 + 30, 10, 5, {bucket_of(500.0): 10})
    m.add(60.0 * 12, 30, 0, {bucket_of(20.0): 30})
    samples = m.samples(60.0 * 12 + 30)
    assert len(samples) == 60 and samples[-1]["t"] == 720
    ten = next(s for s in samples if s["t"] == 600)
    assert ten["requests"] == 100 and ten["errors"] == 5 and ten["error_rate"] == 0.05
    assert 9 < ten["p50"] < 11 and 450 < ten["p99"] < 550
    assert samples[-1]["requests_per_s"] == 1.0  # 30 requests over the 30 s the minute has had
    assert next(s for s in samples if s["t"] == 660)["requests"] == 0
    m.add(60.0 * 80, 1, 0, {})
    assert all(s["t"] > 60 * 20 for s in m.samples(60.0 * 80)) and len(m._slots) == 1


def test_status_words():
    assert status_word("running", 1, 1, 3) == "Running"
    assert status_word("running", 0, 1, 2) == "Failing"
    assert status_word("running", 0, 0, 1) == "Failing"
    assert status_word("running", 0, 1, 0) == "Idle"
    assert status_word("running", 0, 0, 0) == "Standby"
    assert status_word("stopped", 0, 0, 5) == "Stopped"
    assert status_word("stopped", 0, 2, 0) == "Idle"  # draining after stop


def test_charts_draw_every_series_and_escape_text():
    now = 3600.0 * 5
    history = [{"t": now - 60 * (59 - i), "requests": i, "requests_per_s": i / 60, "errors": 0, "error_rate": 0.0,
                "p50": 10.0 + i, "p95": 20.0 + i if i % 2 else None, "p99": 30.0 + i} for i in range(60)]
    latency, rate = history_charts(history, now)
    assert latency.startswith('<svg id="chart-latency"') and latency.count("<polyline") == 2
    assert latency.count("<circle") == 30  # p95 has gaps: single points
    assert 'id="chart-rate"' in rate and "req/s" in rate
    svg = line_chart("<b>x</b>", "", [0, 1], [("s&p", "red", [None, None])], "c")
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "s&amp;p" in svg and "no requests in the last hour" in svg


def test_sessions_are_signed_and_expire_and_csrf_is_bound_to_the_session():
    signer = Sessions(b"k" * 32, ttl_s=60)
    cookie = signer.issue("operator", now=1000.0)
    s = signer.read(cookie, now=1010.0)
    assert s is not None and s.role == "operator" and s.can_act
    assert signer.read(cookie, now=1061.0) is None
    body, mac = cookie.split(".")
    forged = body.replace(body[:4], "eyJy") + "." + mac[::-1]
    assert signer.read(forged, 1010.0) is None and signer.read("garbage", 1010.0) is None
    assert Sessions(b"j" * 32).read(cookie, 1010.0) is None
    other = signer.read(signer.issue("operator", 1000.0), 1010.0)
    assert signer.csrf_ok(s, signer.csrf(s)) and not signer.csrf_ok(s, signer.csrf(other)) and not signer.csrf_ok(s, "")


def test_a_failing_status_line_names_the_error_and_the_last_log_line():
    from controller.policy.status import brief_error
    err = "instance abc exited with code 3 before it was ready; last log lines:\nloading\nboom: weights missing\n"
    assert brief_error(err) == ("instance abc exited with code 3 before it was ready; last log lines: ... "
                                "boom: weights missing")
    assert brief_error("one line") == "one line" and brief_error(None) == ""
    assert len(brief_error("x" * 1000)) == 240


def test_a_start_cut_short_by_a_stop_is_recorded_as_cancelled_and_forgotten():
    cs = ColdStarts()
    cs.begin("a", "dep", "cold start", queued_since=0.0, now=0.0)
    cs.mark("a", "create", 0.5)
    cs.forget(set(), {"dep"}, now=1.0)
    assert cs.of("a", 1.0) is None
    assert [r["outcome"] for r in cs.recent_of("dep", 1.0)] == ["cancelled"]
    assert cs.slowest_since("dep", 0) is None  # not a cold-start time
    cs.forget(set(), set(), now=2.0)
    assert cs.recent_of("dep", 2.0) == [] and cs.histograms()["series"] == []


def test_chart_minutes_saved_in_the_store_come_back_after_a_restart(tmp_path):
    from controller.store import Store
    from controller.traffic import Traffic
    store = Store(tmp_path / "autodeploy.db")
    before = Traffic()
    t0 = 60 * 1000.0
    before.observe(t0 + 5, {"i1": {"d": "web", "n": 10, "e": 2, "h": {"20": 10}}})
    before.observe(t0 + 65, {"i1": {"d": "web", "n": 4, "e": 0, "h": {"30": 4}}})
    store.save_minutes(before.unsaved_minutes())
    assert before.unsaved_minutes() == []  # saved once
    after = Traffic()  # the restarted controller
    after.observe(t0 + 70, {"i2": {"d": "web", "n": 1, "e": 0, "h": {"30": 1}}})
    after.restore_minutes(store.minutes())
    points = {p["t"]: p for p in after.history("web", t0 + 80) if p["requests"]}
    assert points[t0]["requests"] == 10 and points[t0]["errors"] == 2 and points[t0]["p50"] is not None
    assert points[t0 + 60]["requests"] == 5  # a minute counted on both sides of the restart adds up
