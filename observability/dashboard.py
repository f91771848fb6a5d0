"""KlipNote's Grafana dashboard, built with Ray's own dashboard generator and conventions.

    .venvs/ingress/bin/python -m observability.dashboard   # writes observability/klipnote_grafana_dashboard.json

Ray's dashboard embeds Grafana dashboards built from `Panel`s and `Target`s
(ray.dashboard.modules.metrics.dashboards); this one is built the same way, on the base of Ray's
default dashboard: a `datasource` variable, and every query filtered by the `SessionName` and
`Cluster` variables ({global_filters}). The metric names are those of `serve_app/metrics.py`,
`deployments/metrics.py`, `serve_app/jobs/metrics.py` and Ray Serve's own; tests/test_observability.py evaluates every query
here against a real Prometheus scraping the test cluster, so none can silently go empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Row, Target

OUTPUT = Path(__file__).with_name("klipnote_grafana_dashboard.json")
TITLE = "KlipNote Serve"
UID = "klipnoteServe"

GPU_ONLY_METRICS = ("ray_klipnote_model_gpu_memory_bytes", "ray_klipnote_model_gpu_memory_cap_bytes")
"""Exported only by replicas on a GPU: their panel is empty on a CPU cluster (and in the test)."""
NOT_PROVOKED_IN_TESTS = {
    "ray_klipnote_model_no_speech_windows_total": "a window that passes VAD yet decodes to no text comes, on the base weights here, "
    "only after temperature fallback samples, which a replica's RNG makes random; tests/test_belle2_speedups.py counts it in a fresh core",
}
"""Queries of these may be empty after the dashboard test's provocations, each for the reason given."""

F = "{global_filters}"


def _rate(metric: str, by: str, window: str = "5m") -> str:
    return f"sum(rate({metric}{{{{{F}}}}}[{window}])) by ({by})"


def _quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum(rate({histogram}_bucket{{{{{F}}}}}[5m])) by ({labels}))"


TRAFFIC = Row(title="Traffic", id=100, panels=[
    Panel(id=1, title="Requests by model served", unit="reqps",
          description="Transcription requests answered per second, by the model that served them (\"none\": refused or failed before a model).",
          targets=[Target(expr=_rate("ray_klipnote_requests_total", "model"), legend="{{model}}")]),
    Panel(id=2, title="Requests by outcome", unit="reqps",
          description="Requests per second by status class and error code (\"\": success). Refusals by admission control are ingress_overloaded and model_overloaded.",
          targets=[Target(expr=_rate("ray_klipnote_requests_total", "status_class, code"), legend="{{status_class}} {{code}}")]),
    Panel(id=3, title="Requests by language", unit="reqps",
          description="Requests per second by the language of the result (detected, or the one asked for).",
          targets=[Target(expr=_rate("ray_klipnote_requests_total", "language"), legend="{{language}}")]),
    Panel(id=4, title="Audio served per second", unit="s",
          description="Seconds of audio answered per wall-clock second, by model (2 = two real-time streams' worth).",
          targets=[Target(expr=_rate("ray_klipnote_audio_seconds_total", "model"), legend="{{model}}")]),
    Panel(id=5, title="Streams open", unit="short", stack=False,
          description="Streamed transcriptions (server-sent events) being answered now, per ingress replica.",
          targets=[Target(expr=f"sum(ray_klipnote_streams_open{{{{{F}}}}}) by (replica)", legend="{{replica}}")]),
    Panel(id=6, title="Upload volume", unit="Bps",
          description="Bytes of uploaded media per second.",
          targets=[Target(expr=f"sum(rate(ray_klipnote_upload_bytes_total{{{{{F}}}}}[5m]))", legend="uploads")]),
])

LATENCY = Row(title="Latency", id=101, panels=[
    Panel(id=7, title="Request latency", unit="s", stack=False, fill=0,
          description="Seconds from a request's arrival to the end of its answer (a stream's included): p50, p95, p99.",
          targets=[Target(expr=_quantile(q, "ray_klipnote_request_seconds"), legend=f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)]),
    Panel(id=8, title="Time per stage (p95)", unit="s", stack=False, fill=0,
          description="Per request: opening the upload (open), decoding it (decode), language ID (langid, langid_stretches) and waiting for the model apps (model).",
          targets=[Target(expr=_quantile(0.95, "ray_klipnote_stage_seconds", "stage"), legend="{{stage}}")]),
    Panel(id=9, title="Language ID", unit="short", stack=False, fill=0,
          description="Seconds per language-ID pass (p95), and the median probability of the language it heard: a falling median means unsure routing.",
          targets=[Target(expr=_quantile(0.95, "ray_klipnote_language_id_seconds"), legend="seconds p95"),
                   Target(expr=_quantile(0.5, "ray_klipnote_language_id_confidence"), legend="confidence p50")]),
])

MODELS = Row(title="Models", id=102, panels=[
    Panel(id=10, title="Real-time factor by model", unit="short", stack=False, fill=0,
          description="Processing seconds per second of audio, per request, p50 and p95 by model app: above 1 a model falls behind real time.",
          targets=[Target(expr=_quantile(q, "ray_klipnote_model_real_time_factor", "application"), legend=f"{{{{application}}}} p{int(q * 100)}")
                   for q in (0.5, 0.95)]),
    Panel(id=11, title="Model throughput", unit="short", stack=False, fill=0,
          description="Seconds of audio transcribed per second spent transcribing, by model app (requests overlap, so it can exceed 1/RTF).",
          targets=[Target(expr=f"{_rate('ray_klipnote_model_audio_seconds_total', 'application')} / {_rate('ray_klipnote_model_processing_seconds_total', 'application')}",
                          legend="{{application}}")]),
    Panel(id=12, title="Windows and batch size", unit="short", stack=False, fill=0,
          description="Windows (up to 30 s) decoded per second, and the mean windows per model call (cross-request batching at work).",
          targets=[Target(expr=_rate("ray_klipnote_model_windows_total", "application"), legend="{{application}} windows/s"),
                   Target(expr=f"{_rate('ray_klipnote_model_batch_size_sum', 'application')} / {_rate('ray_klipnote_model_batch_size_count', 'application')}",
                          legend="{{application}} mean batch")]),
    Panel(id=13, title="Hallucination guards", unit="short",
          description="Per second, by model app: windows decoded again at a higher temperature, segments whose repetition loop was cut, windows that decoded to no text.",
          targets=[Target(expr=_rate("ray_klipnote_model_temperature_retries_total", "application"), legend="{{application}} temperature retries"),
                   Target(expr=_rate("ray_klipnote_model_repetition_collapses_total", "application"), legend="{{application}} repetition loops cut"),
                   Target(expr=_rate("ray_klipnote_model_no_speech_windows_total", "application"), legend="{{application}} no-speech windows")]),
    Panel(id=14, title="Model app errors", unit="short",
          description="Requests a model app answered with an error, per second, by app and error type (InvalidOptionsError and InvalidAudioError are the caller's).",
          targets=[Target(expr=_rate("ray_klipnote_model_failures_total", "application, error"), legend="{{application}} {{error}}")]),
])

ROUTING = Row(title="Fallbacks and admission", id=103, panels=[
    Panel(id=15, title="Fallbacks (last hour)", unit="short",
          description="Model calls the fallback model served, by the model that could not serve and why (model_overloaded, model_unavailable, timeout, model_failed...).",
          targets=[Target(expr=f"sum(increase(ray_klipnote_fallbacks_total{{{{{F}}}}}[1h])) by (from_model, to_model, reason)",
                          legend="{{from_model}}->{{to_model}} {{reason}}")]),
    Panel(id=16, title="Rejections", unit="reqps",
          description="Requests refused with 503 per second: ingress_overloaded (the ingress's admission limit) or model_overloaded (a model app's queue, no fallback).",
          targets=[Target(expr=_rate("ray_klipnote_rejections_total", "application, code"), legend="{{application}} {{code}}")]),
    Panel(id=17, title="Queued and running requests", unit="short", stack=False, fill=0,
          description="Serve's own: requests waiting in callers' queues for each deployment, and requests its replicas are processing.",
          targets=[Target(expr=f"sum(ray_serve_deployment_queued_queries{{{{{F}}}}}) by (application, deployment)", legend="{{application}} queued"),
                   Target(expr=f"sum(ray_serve_replica_processing_queries{{{{{F}}}}}) by (application, deployment)", legend="{{application}} running")]),
])

REPLICAS = Row(title="Replicas and memory", id=104, panels=[
    Panel(id=18, title="Healthy replicas", unit="short", stack=False, fill=0,
          description="Healthy replicas per application (Serve's own; autoscaling moves it).",
          targets=[Target(expr=f"sum(ray_serve_deployment_replica_healthy{{{{{F}}}}}) by (application)", legend="{{application}}")]),
    Panel(id=19, title="Replica memory (RSS)", unit="bytes", stack=False, fill=0,
          description="Resident memory of each Serve replica process (Ray's per-component memory).",
          targets=[Target(expr=f'sum(ray_component_rss_mb{{{{Component=~"ray::ServeReplica:.*",{F}}}}} * 1024 * 1024) by (Component)', legend="{{Component}}")]),
    Panel(id=20, title="GPU memory against its cap", unit="bytes", stack=False, fill=0,
          description="GPU memory each model replica uses, and what its share of the card allows (only with a GPU).",
          targets=[Target(expr=f"sum({GPU_ONLY_METRICS[0]}{{{{{F}}}}}) by (application, replica)", legend="{{application}} {{replica}} used"),
                   Target(expr=f"sum({GPU_ONLY_METRICS[1]}{{{{{F}}}}}) by (application, replica)", legend="{{application}} {{replica}} cap")]),
    Panel(id=21, title="Model load time", unit="s", stack=False, fill=0,
          description="Seconds each model replica took to load its model (a slow start shows here before autoscaling does).",
          targets=[Target(expr=f"max(ray_klipnote_model_load_seconds{{{{{F}}}}}) by (application)", legend="{{application}}")]),
])

JOBS = Row(title="Jobs", id=105, panels=[
    Panel(id=22, title="Jobs queued and running", unit="short", stack=False, fill=0,
          description="Jobs waiting and being transcribed now, across the job database (every runner replica reports the same count: the max is taken).",
          targets=[Target(expr=f"max(ray_klipnote_jobs{{{{{F}}}}}) by (application, status)", legend="{{application}} {{status}}")]),
    Panel(id=23, title="Jobs ended (last hour)", unit="short",
          description="Jobs that succeeded, failed (by error code) or were cancelled.",
          targets=[Target(expr=f"sum(increase(ray_klipnote_jobs_finished_total{{{{{F}}}}}[1h])) by (status, code)", legend="{{status}} {{code}}")]),
    Panel(id=24, title="Job wait and run time", unit="s", stack=False, fill=0,
          description="p50 and p95 of the seconds from submission to start, and from start to result of succeeded jobs.",
          targets=[Target(expr=_quantile(0.5, "ray_klipnote_job_queue_seconds"), legend="queued p50"),
                   Target(expr=_quantile(0.95, "ray_klipnote_job_queue_seconds"), legend="queued p95"),
                   Target(expr=_quantile(0.5, "ray_klipnote_job_run_seconds"), legend="running p50"),
                   Target(expr=_quantile(0.95, "ray_klipnote_job_run_seconds"), legend="running p95")]),
    Panel(id=25, title="Webhook deliveries (last hour)", unit="short",
          description="Webhook delivery attempts: delivered, retry (not delivered, tried again later), failed (refused, or no attempts left).",
          targets=[Target(expr=f"sum(increase(ray_klipnote_job_webhooks_total{{{{{F}}}}}[1h])) by (outcome)", legend="{{outcome}}")]),
])

CONFIG = DashboardConfig(
    name="KLIPNOTE",
    default_uid=UID,
    rows=[TRAFFIC, LATENCY, MODELS, ROUTING, REPLICAS, JOBS],
    standard_global_filters=['SessionName=~"$SessionName"', 'ray_io_cluster=~"$Cluster"'],
    base_json_file_name="default_grafana_dashboard_base.json",
)


def build() -> str:
    """The dashboard's JSON (Ray's generator on `CONFIG`, titled and keyed as KlipNote's)."""
    from ray.dashboard.modules.metrics.grafana_dashboard_factory import _generate_grafana_dashboard

    content, _ = _generate_grafana_dashboard(CONFIG)
    dashboard = json.loads(content)
    dashboard["title"] = TITLE
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(build())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
