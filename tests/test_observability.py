"""Operating the service: its metrics in a real Prometheus, the Grafana dashboard's every query
answered, request ids in the replicas' JSON logs.

A real Prometheus (the Debian package; `make test` installs it where missing) scrapes the test
cluster through Ray's service discovery file, as the README tells operators to. Every event a
panel shows is provoked first, for real: requests to both models (one streamed), a fallback
(a probe ingress whose belle2 app is not deployed), a rejection (the probe's one admission slot
held by a stalled upload), a model app refusing options, and, through the model apps' handles,
a temperature retry (speech played backwards) and a repetition loop (one syllable over and over,
decoded at temperature 0). Exempt: the GPU-memory panel (no GPU here) and the no-speech windows
(`observability.dashboard.NOT_PROVOKED_IN_TESTS` says why).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List

import httpx
import pytest

from observability.dashboard import GPU_ONLY_METRICS, NOT_PROVOKED_IN_TESTS, build
from runtime_envs.local_cluster import free_port
from tests.conftest import ROOT
from tests.test_admission import _stalled_upload, _wait_in_flight
from tests.test_hardening_live import _post
from tests.test_webhooks import Receiver
from tests.signals import looped_syllable, reversed_speech

DASHBOARD = ROOT / "observability" / "klipnote_grafana_dashboard.json"
PROBE = "probe-metrics"
ZH = "zh_paddlespeech_zh.flac"
EN = "en_jfk.flac"


def test_the_committed_dashboard_is_what_the_generator_builds():
    """observability/dashboard.py is the source: `python -m observability.dashboard` after a change."""
    assert DASHBOARD.read_text() == build()


def dashboard_queries(dashboard: dict) -> List[tuple]:
    """(panel title, PromQL) of every target in every panel, rows' panels included."""
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def test_the_dashboard_follows_rays_conventions():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "SessionName" in variables
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 25
    for title, expr in queries:
        assert 'SessionName=~"$SessionName"' in expr, (title, expr)
        assert "or vector(0)" not in expr, (title, expr)  # a query that cannot come back empty proves nothing
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            if inner.get("type") != "row":
                assert inner["datasource"] == "${datasource}", inner["title"]


# -- a real Prometheus ----------------------------------------------------------------------------


class Prometheus:
    def __init__(self, discovery_file: Path):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (make test installs the Debian package)"
        self._dir = Path(tempfile.mkdtemp(prefix="klipnote-prometheus-"))
        config = self._dir / "prometheus.yml"
        # As Ray's own generated config (ray/dashboard/modules/metrics/templates.py), scraping faster.
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: ray\n"
            f"    file_sd_configs: [{{files: ['{discovery_file}'], refresh_interval: 1s}}]\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(self._dir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self._proc.poll() is None and time.monotonic() < deadline, (self._dir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)

    def query(self, expr: str) -> List[dict]:
        """An instant query's series; AssertionError with Prometheus's message on a bad query."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def targets_up(self) -> int:
        return len(self.query("max_over_time(up[1m]) == 1"))

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(serve_cluster):
    import ray

    node = ray._private.worker._global_node
    server = Prometheus(Path(node.get_session_dir_path()) / "prom_metrics_service_discovery.json")
    try:
        yield server
    finally:
        server.stop()


def _probe_ingress(serve_cluster) -> dict:
    # belle2 names an app that is not deployed: Mandarin falls back to whisperx
    return serve_cluster.ingress_variant(PROBE, model_apps={"belle2": "belle2-not-deployed", "whisperx": "whisperx"}, max_in_flight=1, capacity_refresh_s=0)


def _provoke_everything(serve_cluster, data_dir) -> Dict[str, object]:
    """Every event the dashboard shows, for real; returns what was seen on the way."""
    from ray import serve

    from serve_app.audio import decode_audio

    url = serve_cluster.url
    zh, en = (data_dir / ZH).read_bytes(), (data_dir / EN).read_bytes()
    seen: Dict[str, object] = {}

    r = _post(url, zh, "zh.flac", response_format="verbose_json")
    assert r.status_code == 200 and r.json()["model"] == "belle2", r.text
    r = _post(url, en, "en.flac", response_format="text")
    assert r.status_code == 200 and r.headers["X-KlipNote-Model"] == "whisperx", r.text
    with httpx.stream("POST", f"{url}/v1/audio/transcriptions", files={"file": ("zh.flac", zh)}, data={"stream": "true"}, timeout=600) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1][6:])["type"] == "transcript.text.done", events[-1]

    # the model apps' own events, through their handles
    speech = decode_audio(zh, max_seconds=3600)
    belle2 = serve.get_app_handle("belle2")
    # one retry at most: the greedy pass over reversed speech fails the log-probability threshold
    seen["reversed"] = belle2.transcribe.remote(reversed_speech(speech), {"language": "zh", "temperature": [0.0, 1.0]}).result(timeout_s=600)
    seen["loop"] = belle2.transcribe.remote(looped_syllable(speech), {"language": "zh", "temperature": [0.0]}).result(timeout_s=600)
    assert any(w.startswith("Collapsed a repetition loop") for w in seen["loop"]["warnings"]), seen["loop"]
    with pytest.raises(Exception, match="max_beam_size"):
        serve.get_app_handle("whisperx").transcribe.remote(decode_audio(en, max_seconds=3600), {"beam_size": 99}).result(timeout_s=600)

    # a job, from its queue to its webhook
    receiver = Receiver()
    try:
        submitted = httpx.post(f"{url}/v1/audio/transcriptions/jobs", files={"file": ("en.flac", en)}, data={"callback_url": receiver.url}, timeout=120)
        assert submitted.status_code == 202, submitted.text
        deadline = time.monotonic() + 600
        while not receiver.requests:
            assert time.monotonic() < deadline, "the job's webhook never came"
            time.sleep(0.5)
        assert json.loads(receiver.requests[0]["body"])["status"] == "succeeded"
    finally:
        receiver.close()

    # a fallback and a rejection, at the probe ingress
    r = _post(f"{url}/{PROBE}", zh, "zh.flac", response_format="verbose_json")
    assert r.status_code == 200 and r.headers["X-KlipNote-Fallback"] == "belle2->whisperx", r.text
    _wait_in_flight(PROBE, 0)
    holder = _stalled_upload(url, f"/{PROBE}/v1/audio/transcriptions")  # the probe's one slot, held
    try:
        _wait_in_flight(PROBE, 1)
        r = _post(f"{url}/{PROBE}", zh, "zh.flac")
        assert r.status_code == 503 and r.json()["error"]["code"] == "ingress_overloaded", r.text
        assert r.headers.get("X-Request-Id"), r.headers  # a refusal carries its id too
    finally:
        holder.close()
    return seen


def _substitute(expr: str, session_name: str) -> str:
    """The query as Grafana sends it with this session selected and every cluster."""
    return expr.replace("$SessionName", session_name).replace("$Cluster", ".*")


@pytest.mark.slow
def test_every_dashboard_query_returns_series_from_a_real_prometheus(serve_cluster, prometheus, data_dir):
    import ray

    with serve_cluster.beside(_probe_ingress(serve_cluster)):
        _provoke_everything(serve_cluster, data_dir)
    assert prometheus.targets_up() >= 1

    session = ray._private.worker._global_node.session_name
    queries = [(title, _substitute(expr, session)) for title, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))]
    exempt = [(title, expr) for title, expr in queries if any(m in expr for m in (*GPU_ONLY_METRICS, *NOT_PROVOKED_IN_TESTS))]
    assert len(exempt) == 3  # the GPU-memory panel's two queries and the no-speech windows', nothing else
    checked = [q for q in queries if q not in exempt]
    # Ray's agent exports what replicas report every few seconds; Prometheus scrapes every second.
    deadline = time.monotonic() + 180
    while True:
        empty = [(title, expr) for title, expr in checked if not prometheus.query(expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not empty, "dashboard queries with no series:\n" + "\n".join(f"{t}: {e}" for t, e in empty)

    # and the series say what happened. A scrape that times out (1 s here, on two busy cores) marks
    # every series of its target stale, so an instant query can miss a series that is there: a
    # range selector skips the staleness markers.
    def labels(selector: str) -> List[dict]:
        return [series["metric"] for series in prometheus.query(f"last_over_time({selector}[10m])")]

    assert {"from_model": "belle2", "to_model": "whisperx", "reason": "model_unavailable"} in [
        {k: m[k] for k in ("from_model", "to_model", "reason")} for m in labels("ray_klipnote_fallbacks_total")]
    assert {"application": PROBE, "code": "ingress_overloaded"} in [
        {k: m.get(k) for k in ("application", "code")} for m in labels("ray_klipnote_rejections_total")]
    served = {m["model"] for m in labels('ray_klipnote_requests_total{application="transcription",status_class="2xx"}')}
    assert {"belle2", "whisperx"} <= served, served
    formats = {m["response_format"] for m in labels('ray_klipnote_requests_total{application="transcription"}')}
    assert {"verbose_json", "text", "json"} <= formats, formats
    guards = {name: {m["application"] for m in labels(f"ray_klipnote_model_{name}_total")}
              for name in ("temperature_retries", "repetition_collapses")}
    assert all("belle2" in apps for apps in guards.values()), guards
    assert {"application": "whisperx", "error": "InvalidOptionsError"} in [
        {k: m[k] for k in ("application", "error")} for m in labels("ray_klipnote_model_failures_total")]
    assert {"status": "succeeded", "code": None} in [{k: m.get(k) for k in ("status", "code")} for m in labels("ray_klipnote_jobs_finished_total")]
    assert "delivered" in {m["outcome"] for m in labels("ray_klipnote_job_webhooks_total")}
    assert {"queued", "running"} <= {m["status"] for m in labels('ray_klipnote_jobs{application="transcription"}')}
    # the SessionName variable's own query (label_values) finds this session
    sessions = {m["metric"].get("SessionName") for m in prometheus.query("group by (SessionName) (last_over_time(ray_node_network_receive_speed[10m]))")}
    assert session in sessions, sessions


# -- request ids in the logs ----------------------------------------------------------------------


def _log_records(pattern: str, request_id: str) -> List[dict]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    records = []
    for path in logs.glob(pattern):
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return records


def _wait_for_records(pattern: str, request_id: str, want, timeout_s: float = 30) -> List[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = _log_records(pattern, request_id)
        if want(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


@pytest.mark.slow
def test_a_request_id_follows_the_request_from_the_ingress_into_the_model_apps_logs(serve_cluster, data_dir):
    request_id = f"klipnote-test-{uuid.uuid4()}"
    r = _post(serve_cluster.url, (data_dir / EN).read_bytes(), "en.flac", headers={"X-Request-Id": request_id})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == request_id, (r.status_code, r.headers)

    def ours(records: List[dict], request_id: str = request_id) -> List[str]:
        return [rec["message"] for rec in records if rec.get("request_id") == request_id and not rec["message"].startswith(("CALL ", "POST "))]

    ingress = _wait_for_records("replica_transcription_TranscriptionIngress_*.log", request_id, lambda recs: ours(recs))
    model = _wait_for_records("replica_whisperx_WhisperXTranscriber_*.log", request_id, lambda recs: ours(recs))
    # Serve's JSON lines, each with the request's id: our own lines (routing in the ingress, the
    # model app's account of the decode), not only Serve's access lines
    assert any(m.startswith("Routing to whisperx") for m in ours(ingress)), ingress
    assert any(m.startswith("Transcribed ") and "real-time factor" in m for m in ours(model)), model
    assert all(rec["application"] == "whisperx" and rec["deployment"] == "whisperx_WhisperXTranscriber" for rec in model), model

    # without one from the client, Serve makes one up, answers with it and logs under it
    r = _post(serve_cluster.url, (data_dir / EN).read_bytes(), "en.flac")
    generated = r.headers["X-Request-Id"]
    assert r.status_code == 200 and generated
    records = _wait_for_records("replica_whisperx_WhisperXTranscriber_*.log", generated, lambda recs: bool(ours(recs, generated)))
    assert any(m.startswith("Transcribed ") for m in ours(records, generated)), records
