"""Transcription jobs end to end on the session cluster: real HTTP, the real job runner, the real
models, a real webhook receiver; the PostgreSQL path against a real server.

The session config runs one job at a time (`jobs.max_running: 1`, runtime_envs/local.yaml) with
a 10 s lease. The kill-and-resume and whole-cluster-restart tests are marked `chaos` (run last).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Dict, List

import httpx
import pytest

from serve_app.jobs.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify
from tests.conftest import SMALL_PIECES
from tests.postgres import postgres_url  # noqa: F401  (fixture)
from tests.test_webhooks import Receiver

pytestmark = pytest.mark.slow

ZH_70S = "zh_funasr_vad_example_70s.flac"
EN = "en_jfk.flac"
JOBS = "/v1/audio/transcriptions/jobs"


def submit(url: str, audio: bytes, name: str = "a.flac", **form) -> httpx.Response:
    return httpx.post(f"{url}{JOBS}", files={"file": (name, audio)}, data=form, timeout=120)


def job(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}{JOBS}/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(url: str, job_id: str, until: Callable[[dict], bool], timeout_s: float = 600, every_s: float = 0.3) -> List[dict]:
    """Polls the job until `until(job)`; returns every distinct state seen (the last one last)."""
    seen: List[dict] = []
    deadline = time.monotonic() + timeout_s
    while True:
        current = job(url, job_id)
        if not seen or {k: current[k] for k in ("status", "stage", "progress")} != {k: seen[-1][k] for k in ("status", "stage", "progress")}:
            seen.append(current)
        else:
            seen[-1] = current
        if until(current):
            return seen
        assert time.monotonic() < deadline, f"job {job_id} never got there: {seen[-1]}"
        time.sleep(every_s)


def finished(j: dict) -> bool:
    return j["status"] in ("succeeded", "failed", "cancelled")


def events_of(url: str, job_id: str) -> List[dict]:
    with httpx.stream("GET", f"{url}{JOBS}/{job_id}/events", timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def media_files(serve_cluster) -> List[str]:
    media = Path(serve_cluster.jobs_dir) / "media"
    return sorted(p.name for p in media.iterdir()) if media.exists() else []


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_a_job_from_submission_to_result_webhook_and_deletion(serve_cluster, data_dir, receiver):
    url = serve_cluster.url
    audio = (data_dir / ZH_70S).read_bytes()
    answer = submit(url, audio, name="meeting.flac", callback_url=receiver.url)
    assert answer.status_code == 202, answer.text
    created = answer.json()
    job_id = created["id"]
    assert created["object"] == "transcription.job" and created["status"] in ("queued", "running")
    assert answer.headers["location"] == f"{JOBS}/{job_id}" == created["links"]["self"]
    assert created["filename"] == "meeting.flac" and created["progress"]["total_seconds"] == pytest.approx(70.0, abs=1.0)

    states = wait_for(url, job_id, finished)
    done = states[-1]
    assert done["status"] == "succeeded", done
    # (a 70 s recording is one piece here: the PostgreSQL test's app cuts pieces of 20 s and sees progress move)
    assert [s["status"] for s in states] == sorted((s["status"] for s in states), key=["queued", "running", "succeeded"].index)
    assert done["progress"]["done_seconds"] == pytest.approx(70.0, abs=1.0)
    assert done["model"] == "belle2" and done["progress"]["fraction"] == 1.0 and done["attempt"] == 1
    result = done["result"]
    assert result["language"] == "zh" and result["model"] == "belle2" and result["segments"]
    assert all(1.0 <= s["end"] - s["start"] <= 7.0 + 1e-6 and len(s["text"]) < 200 for s in result["segments"])
    assert job_id not in media_files(serve_cluster)  # removed once the job ended

    # every rendering of the result
    rendered = {fmt: httpx.get(f"{url}{JOBS}/{job_id}", params={"format": fmt}, timeout=30) for fmt in ("text", "srt", "vtt", "json", "verbose_json")}
    assert all(r.status_code == 200 for r in rendered.values())
    assert rendered["text"].text == result["text"] and rendered["json"].json() == {"text": result["text"]}
    assert rendered["srt"].text.startswith("1\n00:00:") and rendered["srt"].text.count(" --> ") == len(result["segments"])
    assert rendered["vtt"].text.startswith("WEBVTT") and rendered["vtt"].headers["content-type"].startswith("text/vtt")
    assert rendered["verbose_json"].json() == result

    # the events of a finished job: its segments, the text, then done
    events = events_of(url, job_id)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.segment") == len(result["segments"])
    assert "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta") == result["text"]

    # the webhook: signed, the job's id, status and links, not the transcript
    deadline = time.monotonic() + 60
    while not receiver.requests:
        assert time.monotonic() < deadline, "no webhook arrived"
        time.sleep(0.2)
    (hook,) = receiver.requests
    assert verify(hook["body"], hook["headers"][SIGNATURE_HEADER.lower()], serve_cluster.webhook_secret, now=time.time())
    assert not verify(hook["body"], hook["headers"][SIGNATURE_HEADER.lower()], "another secret", now=time.time())
    payload = json.loads(hook["body"])
    assert payload["id"] == job_id and payload["status"] == "succeeded" and payload["links"]["self"] == f"{JOBS}/{job_id}"
    assert "text" not in payload and "segments" not in payload and "result" not in payload
    assert hook["headers"][DELIVERY_HEADER.lower()] == f"{job_id}:succeeded" and hook["headers"][EVENT_HEADER.lower()] == "job.succeeded"
    assert job(url, job_id)["webhook"] == {"state": "delivered", "attempts": 1}

    # listed, newest first; then deleted with its result
    listed = httpx.get(f"{url}{JOBS}", params={"limit": 100}, timeout=30).json()
    ids = [j["id"] for j in listed["data"]]
    assert job_id in ids and "result" not in listed["data"][0]
    created_at = [j["created_at"] for j in listed["data"]]
    assert created_at == sorted(created_at, reverse=True)
    deleted = httpx.delete(f"{url}{JOBS}/{job_id}", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": job_id, "object": "transcription.job.deleted", "deleted": True}
    gone = httpx.get(f"{url}{JOBS}/{job_id}", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


def test_a_failed_webhook_delivery_is_retried(serve_cluster, data_dir, receiver):
    url = serve_cluster.url
    receiver.script = [500, 200]
    job_id = submit(url, (data_dir / EN).read_bytes(), callback_url=receiver.url).json()["id"]
    assert wait_for(url, job_id, finished)[-1]["status"] == "succeeded"
    webhook = wait_for(url, job_id, lambda j: j["webhook"]["state"] != "pending", timeout_s=60)[-1]["webhook"]
    assert webhook == {"state": "delivered", "attempts": 2}
    first, second = receiver.requests
    assert first["headers"][DELIVERY_HEADER.lower()] == second["headers"][DELIVERY_HEADER.lower()] == f"{job_id}:succeeded"
    assert verify(second["body"], second["headers"][SIGNATURE_HEADER.lower()], serve_cluster.webhook_secret, now=time.time())


def test_a_queued_job_is_cancelled_at_once_and_a_running_one_stops(serve_cluster, data_dir):
    url = serve_cluster.url
    audio = (data_dir / ZH_70S).read_bytes()
    running_id = submit(url, audio).json()["id"]
    queued = submit(url, audio).json()
    lost_media = submit(url, (data_dir / EN).read_bytes()).json()["id"]
    wait_for(url, running_id, lambda j: j["status"] == "running")
    assert job(url, queued["id"])["status"] == "queued" and job(url, queued["id"])["queue_position"] == 1
    assert job(url, lost_media)["queue_position"] == 2
    (Path(serve_cluster.jobs_dir) / "media" / lost_media).unlink()  # as on a node that does not share the media directory

    cancelled = httpx.delete(f"{url}{JOBS}/{queued['id']}", timeout=30).json()
    assert cancelled["status"] == "cancelled"
    assert queued["id"] not in media_files(serve_cluster)

    stopping = httpx.delete(f"{url}{JOBS}/{running_id}", timeout=30).json()
    assert stopping["status"] == "running" and stopping["cancel_requested"] is True
    end = wait_for(url, running_id, finished, timeout_s=120)[-1]
    assert end["status"] == "cancelled" and end["result"] is None
    assert running_id not in media_files(serve_cluster)
    not_done = httpx.get(f"{url}{JOBS}/{running_id}", params={"format": "srt"}, timeout=30)
    assert not_done.status_code == 409 and not_done.json()["error"]["code"] == "job_not_finished"
    events = events_of(url, running_id)
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "job_cancelled"
    # a finished job's DELETE removes it
    assert httpx.delete(f"{url}{JOBS}/{running_id}", timeout=30).json()["deleted"] is True
    # the job whose upload went missing fails with a code that says so
    failed = wait_for(url, lost_media, finished, timeout_s=120)[-1]
    assert failed["status"] == "failed" and failed["error"]["code"] == "job_media_missing", failed
    assert "media directory" in failed["error"]["message"] and str(serve_cluster.jobs_dir) not in failed["error"]["message"]


@pytest.mark.parametrize(
    "form, file, status, code",
    [
        ({"callback_url": "ftp://example.com/hook"}, None, 400, "invalid_callback_url"),
        ({"stream": "true"}, None, 400, "unsupported_option"),
        ({}, ("notes.txt", b"these are not audio " * 100), 415, "unsupported_media"),
        ({}, ("empty.flac", b""), 400, "invalid_audio"),
    ],
)
def test_a_bad_submission_is_refused_and_nothing_is_kept(serve_cluster, data_dir, form, file, status, code):
    url = serve_cluster.url
    before = media_files(serve_cluster)
    name, audio = file or ("a.flac", (data_dir / EN).read_bytes())
    r = submit(url, audio, name=name, **form)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert media_files(serve_cluster) == before


def test_unknown_jobs_and_bad_queries_get_clear_errors(serve_cluster):
    url = serve_cluster.url
    for method, path, params, status, code in [
        ("GET", f"{JOBS}/job_0123456789abcdef0123", None, 404, "job_not_found"),
        ("DELETE", f"{JOBS}/job_0123456789abcdef0123", None, 404, "job_not_found"),
        ("GET", f"{JOBS}/job_0123456789abcdef0123/events", None, 404, "job_not_found"),
        ("GET", JOBS, {"limit": 0}, 400, "invalid_limit"),
        ("GET", JOBS, {"after": "job_0123456789abcdef0123"}, 404, "job_not_found"),
        ("GET", f"{JOBS}/job_0123456789abcdef0123", {"format": "docx"}, 400, "invalid_format"),
    ]:
        r = httpx.request(method, f"{url}{path}", params=params, timeout=30)
        assert r.status_code == status and r.json()["error"]["code"] == code, (method, path, r.text)


def test_another_ray_app_runs_jobs_through_the_handle(serve_cluster, data_dir):
    from ray import serve

    handle = serve.get_app_handle("transcription")
    created = handle.submit_job.remote((data_dir / EN).read_bytes(), filename="jfk.flac", language="en").result(timeout_s=120)
    events = list(handle.options(stream=True).job_events.remote(created["id"]))
    assert events[-1]["type"] == "transcript.text.done" and "ask not what your country" in events[-1]["text"].lower()
    got = handle.get_job.remote(created["id"]).result(timeout_s=30)
    assert got["status"] == "succeeded" and got["model"] == "whisperx" and got["requested_model"] == "auto"
    srt = handle.get_job.remote(created["id"], format="srt").result(timeout_s=30)
    assert srt.startswith("1\n") and " --> " in srt
    listed = handle.list_jobs.remote(limit=1).result(timeout_s=30)
    assert listed["data"][0]["id"] == created["id"]
    assert handle.delete_job.remote(created["id"]).result(timeout_s=30)["deleted"] is True


def test_jobs_on_postgresql_with_progress_limits_and_retention(serve_cluster, data_dir, postgres_url):  # noqa: F811
    """A second ingress app whose jobs live in the real PostgreSQL server: pieces of 20 s (the
    progress of a 70 s recording moves), two jobs at once, one of them on belle2, one job queued
    at most, results kept for 8 s."""
    app = serve_cluster.app_config("transcription", jobs=True)
    app.update(name="probe-jobs-pg", route_prefix="/probe-jobs-pg")
    app["args"]["pieces"] = dict(SMALL_PIECES)
    media = Path(serve_cluster.jobs_dir) / "pg"
    app["args"]["jobs"].update(database_url=postgres_url, data_dir=str(media), max_running=2,
                               max_running_per_model={"belle2": 1}, max_queued=1, retention_s=8)
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    serve_cluster.deploy(extra=[app])
    try:
        serve_cluster.wait(["probe-jobs-pg"])
        url = f"{serve_cluster.url}/probe-jobs-pg"
        long_zh = submit(url, (data_dir / ZH_70S).read_bytes()).json()["id"]
        followed = concurrent.futures.ThreadPoolExecutor(1).submit(events_of, url, long_zh)
        wait_for(url, long_zh, lambda j: j["stage"] == "Transcribing with belle2")
        short_zh = submit(url, (data_dir / "zh_paddlespeech_zh.flac").read_bytes()).json()["id"]
        waiting = wait_for(url, short_zh, lambda j: j["stage"].startswith("Waiting for belle2") or finished(j))[-1]
        assert waiting["status"] == "running" and waiting["stage"] == "Waiting for belle2, which runs 1 job(s) at once", waiting
        answer = submit(url, (data_dir / EN).read_bytes())
        queued = answer.json()
        assert queued["status"] == "queued" and queued["queue_position"] == 1, queued
        # links and Location under the app's route prefix, where a client reaches them
        assert answer.headers["location"] == queued["links"]["self"] == f"/probe-jobs-pg{JOBS}/{queued['id']}"
        assert httpx.get(f"{serve_cluster.url}{queued['links']['self']}", timeout=30).json()["links"] == queued["links"]
        full = submit(url, (data_dir / EN).read_bytes())
        assert full.status_code == 429 and full.json()["error"]["code"] == "jobs_queue_full" and full.headers["retry-after"]

        done = {job_id: wait_for(url, job_id, finished)[-1] for job_id in (long_zh, short_zh, queued["id"])}

        # the long job's events, followed from its submission: its progress moved piece by piece,
        # each piece's segments before the progress that reports it, the result last
        events = followed.result(timeout=120)
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "transcript.text.done" and events[-1]["model"] == "belle2" and "segments" not in events[-1]
        running = [e["done_seconds"] for e in events if e["type"] == "transcript.progress" and e["status"] == "running"]
        assert len({p for p in running if 0 < p < 70}) >= 2 and running == sorted(running), running
        first_segment = kinds.index("transcript.text.segment")
        assert kinds.index("transcript.progress", first_segment) < len(kinds) - 2, kinds
        assert "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta") == events[-1]["text"]
        assert [done[j]["status"] for j in done] == ["succeeded"] * 3, done
        assert [done[j]["model"] for j in done] == ["belle2", "belle2", "whisperx"]
        assert done[short_zh]["started_at"] <= done[long_zh]["finished_at"]  # it waited running, not queued
        from sqlalchemy import create_engine, text

        engine = create_engine(postgres_url)
        with engine.connect() as db:
            rows = db.execute(text("SELECT id, status, attempt FROM klipnote_jobs")).all()
        engine.dispose()
        # (the first jobs may be gone already: they ended more than their retention ago)
        assert (queued["id"], "succeeded", 1) in {tuple(r) for r in rows} <= {(j, "succeeded", 1) for j in done}, rows

        # retention: the records and their media go 8 s after each job ended
        deadline = time.monotonic() + 60
        while any(httpx.get(f"{url}{JOBS}/{j}", timeout=30).status_code != 404 for j in done):
            assert time.monotonic() < deadline, "finished jobs outlived their retention"
            time.sleep(0.5)
        assert list((media / "media").iterdir()) == []
    finally:
        serve_cluster.deploy()
        serve_cluster.wait_gone("probe-jobs-pg")


# -- restarts (run last) ---------------------------------------------------------------------


def _runner_state() -> Dict:
    from ray import serve

    return serve.get_deployment_handle("JobRunner", "transcription").state.remote().result(timeout_s=120)


@pytest.mark.chaos
def test_a_job_whose_runner_is_killed_mid_job_succeeds(serve_cluster, data_dir):
    url = serve_cluster.url
    job_id = submit(url, (data_dir / ZH_70S).read_bytes()).json()["id"]
    wait_for(url, job_id, lambda j: j["stage"] == "Transcribing with belle2", every_s=0.1)  # its one piece at belle2
    state = _runner_state()
    assert state["running"] == [job_id]
    os.kill(state["pid"], signal.SIGKILL)

    done = wait_for(url, job_id, finished, timeout_s=600)[-1]
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert done["result"]["model"] == "belle2" and done["progress"]["fraction"] == 1.0 and done["result"]["duration"] == pytest.approx(70.0, abs=1.0)
    assert _runner_state()["pid"] != state["pid"]


@pytest.mark.chaos
def test_queued_and_running_jobs_survive_a_whole_cluster_restart(serve_cluster, data_dir):
    from serve_app.jobs.store import JobStore

    url = serve_cluster.url
    audio = (data_dir / ZH_70S).read_bytes()
    running_id = submit(url, audio).json()["id"]
    wait_for(url, running_id, lambda j: j["stage"] == "Transcribing with belle2", every_s=0.1)
    queued_id = submit(url, (data_dir / EN).read_bytes()).json()["id"]
    assert job(url, queued_id)["status"] == "queued"

    serve_cluster.stop()  # Serve (gracefully) and Ray: every process of the cluster
    # While nothing runs, the database holds both: the runner handed its job back as it stopped.
    store = JobStore(f"sqlite:///{serve_cluster.jobs_dir}/jobs.sqlite3")
    held = {job_id: store.get(job_id) for job_id in (running_id, queued_id)}
    store.close()
    assert [(j.status, j.attempt, j.lease_token) for j in held.values()] == [("queued", 0, None)] * 2, held
    assert held[running_id].stage == "Queued again: its runner was stopped"
    serve_cluster.start()
    serve_cluster.deploy()
    serve_cluster.wait()

    running = wait_for(url, running_id, finished)[-1]
    queued = wait_for(url, queued_id, finished)[-1]
    assert running["status"] == "succeeded" and running["attempt"] == 1 and running["model"] == "belle2", running
    assert running["result"]["duration"] == pytest.approx(70.0, abs=1.0)
    assert queued["status"] == "succeeded" and queued["attempt"] == 1 and queued["model"] == "whisperx", queued
