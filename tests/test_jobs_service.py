"""The ingress's job operations (`serve_app/jobs/service.py`) on a real SQLite store and real
uploads, without Ray: submission checks, queue limits, cancelling, renderings, events."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from serve_app.admission import is_transcription
from serve_app.audio import UnsupportedMediaError
from serve_app.config import IngressSettings, JobSettings
from serve_app.errors import APIError, JobNotFinishedError, JobNotFoundError, JobsMediaFullError, JobsQueueFullError
from serve_app.jobs.service import JOBS_PATH, JobService, job_view, links, new_job_id, under_prefix

EN = "en_jfk.flac"


def service(tmp_path, **jobs) -> JobService:
    return JobService(IngressSettings(jobs={"data_dir": str(tmp_path), **jobs}))


def submit(jobs: JobService, audio: bytes, **kwargs) -> dict:
    request = {"model": "auto", "options": {}, "segmentation": None, "words": False, "filename": "a.flac"}
    return asyncio.run(jobs.submit(io.BytesIO(audio), request=request, callback_url=kwargs.get("callback_url")))


def test_settings_default_to_sqlite_under_the_data_dir_and_unset_empty_secrets():
    jobs = JobSettings(data_dir="/srv/klipnote/", webhook_secret="", database_url=" ")
    assert jobs.database() == "sqlite:////srv/klipnote/jobs.sqlite3" and jobs.media() == "/srv/klipnote/media"
    assert jobs.webhook_secret is None and jobs.database_url is None
    assert JobSettings(database_url="postgresql+psycopg://u@db/k").database() == "postgresql+psycopg://u@db/k"


def test_job_routes_take_no_admission_slot():
    scope = {"type": "http", "method": "POST", "root_path": ""}
    assert is_transcription({**scope, "path": "/v1/audio/transcriptions"})
    assert is_transcription({**scope, "path": "/v1/audio/translations/"})
    assert not is_transcription({**scope, "path": "/v1/audio/transcriptions/jobs"})


def test_a_submission_is_stored_queued_with_its_length_and_position(tmp_path, data_dir):
    jobs = service(tmp_path)
    first, second = (submit(jobs, (data_dir / EN).read_bytes()) for _ in range(2))
    assert first["status"] == "queued" and first["queue_position"] == 1 and second["queue_position"] == 2
    assert first["progress"] == {"done_seconds": 0.0, "total_seconds": pytest.approx(11.0, abs=0.1), "fraction": 0.0}
    assert (tmp_path / "media" / first["id"]).read_bytes() == (data_dir / EN).read_bytes()
    assert first["links"]["srt"] == f"/v1/audio/transcriptions/jobs/{first['id']}?format=srt"
    assert first["result"] is None and first["webhook"] is None


def test_a_file_that_is_not_audio_leaves_no_job_and_no_media(tmp_path):
    jobs = service(tmp_path)
    with pytest.raises(UnsupportedMediaError):
        submit(jobs, b"<html>not audio</html>" * 50)
    assert list((tmp_path / "media").iterdir()) == [] and jobs.store.count("queued") == 0


def test_a_private_callback_is_refused_unless_allowed(tmp_path, data_dir):
    with pytest.raises(APIError) as refused:
        submit(service(tmp_path), (data_dir / EN).read_bytes(), callback_url="http://127.0.0.1:9/hook")
    assert refused.value.code == "invalid_callback_url" and refused.value.param == "callback_url"
    allowed = submit(service(tmp_path, allow_private_callbacks=True), (data_dir / EN).read_bytes(), callback_url="http://127.0.0.1:9/hook")
    assert allowed["webhook"] == {"state": "none", "attempts": 0}


def test_the_queue_is_bounded(tmp_path, data_dir):
    jobs = service(tmp_path, max_queued=1)
    submit(jobs, (data_dir / EN).read_bytes())
    with pytest.raises(JobsQueueFullError) as full:
        submit(jobs, (data_dir / EN).read_bytes())
    assert full.value.status == 429 and full.value.headers["Retry-After"]


def test_cancel_delete_and_render(tmp_path, data_dir):
    jobs = service(tmp_path)
    queued = submit(jobs, (data_dir / EN).read_bytes())
    cancelled = asyncio.run(jobs.delete(queued["id"]))
    assert cancelled["status"] == "cancelled" and not (tmp_path / "media" / queued["id"]).exists()
    with pytest.raises(JobNotFinishedError):
        asyncio.run(jobs.result(queued["id"], "srt"))
    assert asyncio.run(jobs.delete(queued["id"]))["deleted"] is True
    with pytest.raises(JobNotFoundError):
        asyncio.run(jobs.get(queued["id"]))

    # a running job is asked to stop; a succeeded one renders in every format
    running = submit(jobs, (data_dir / EN).read_bytes())
    claimed = jobs.store.claim(now=time.time(), lease_s=30)
    assert asyncio.run(jobs.delete(running["id"]))["cancel_requested"] is True
    assert jobs.store.renew(claimed.id, claimed.lease_token, now=time.time(), lease_s=30) is True
    result = {"text": "你好。再见。", "language": "zh", "segments": [{"id": 0, "start": 0.0, "end": 1.5, "text": "你好。"}, {"id": 1, "start": 2.0, "end": 3.5, "text": "再见。"}]}
    jobs.store.finish(claimed.id, claimed.lease_token, status="succeeded", now=time.time(), retention_s=60, result=result, stage="Done")
    rendered = {fmt: asyncio.run(jobs.result(claimed.id, fmt)) for fmt in ("text", "json", "srt", "vtt", "verbose_json")}
    assert rendered["text"] == ("text/plain", "你好。再见。") and rendered["json"][1] == {"text": "你好。再见。"}
    assert rendered["srt"][1] == "1\n00:00:00,000 --> 00:00:01,500\n你好。\n\n2\n00:00:02,000 --> 00:00:03,500\n再见。\n"
    assert rendered["vtt"][1].startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n你好。") and rendered["verbose_json"][1] == result

    events = asyncio.run(_collect(jobs.events(claimed.id)))
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.segment", "transcript.text.segment", "transcript.progress", "transcript.text.done"]
    assert events[-1]["text"] == "你好。再见。" and "segments" not in events[-1]


def test_views_show_progress_and_hide_results_in_lists(tmp_path, data_dir):
    jobs = service(tmp_path)
    job_id = submit(jobs, (data_dir / EN).read_bytes())["id"]
    claimed = jobs.store.claim(now=time.time(), lease_s=30)
    jobs.store.progress(job_id, claimed.lease_token, now=time.time(), stage="Transcribing with whisperx", done_seconds=5.5,
                        total_seconds=None, model="whisperx", warnings=["w"], segments=[], text="")
    view = job_view(jobs.store.get(job_id))
    assert view["progress"]["fraction"] == pytest.approx(0.5, abs=0.01) and view["model"] == "whisperx" and view["warnings"] == ["w"]
    assert "result" not in job_view(jobs.store.get(job_id), with_result=False)
    assert len(new_job_id()) == 24 and new_job_id() != new_job_id()


async def _collect(events):
    return [e async for e in events]


def test_an_unreachable_job_database_is_a_503_not_a_dead_ingress(tmp_path, data_dir):
    from tests.postgres import free_port

    jobs = service(tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/klipnote_jobs")
    for call in (lambda: submit(jobs, (data_dir / EN).read_bytes()), lambda: asyncio.run(jobs.get("job_0123456789abcdef0123")),
                 lambda: asyncio.run(jobs.list(limit=5, after=None))):
        with pytest.raises(APIError) as refused:
            call()
        assert refused.value.status == 503 and refused.value.code == "jobs_unavailable" and refused.value.headers["Retry-After"]
    assert list((tmp_path / "media").iterdir()) == []


def test_links_go_under_the_route_prefix_of_the_request():
    job = {"id": "job_1", "links": links("job_1")}
    assert under_prefix(dict(job), "") == job
    assert under_prefix(dict(job), "/team/")["links"]["events"] == f"/team{JOBS_PATH}/job_1/events"
    listed = under_prefix({"object": "list", "data": [{"id": "job_1", "links": links("job_1")}]}, "/team")
    assert listed["data"][0]["links"]["self"] == f"/team{JOBS_PATH}/job_1"
    assert under_prefix({"id": "job_1", "object": "transcription.job", "deleted": True}, "/team") == {"id": "job_1", "object": "transcription.job", "deleted": True}


def test_a_watcher_reads_the_whole_job_again_only_when_it_changed(tmp_path, data_dir):
    jobs = service(tmp_path)
    job_id = submit(jobs, (data_dir / EN).read_bytes())["id"]
    claimed = jobs.store.claim(now=time.time(), lease_s=30)
    reads, polls = [], []
    get, updated_at = jobs.store.get, jobs.store.updated_at
    jobs.store.get = lambda job_id: reads.append(job_id) or get(job_id)
    jobs.store.updated_at = lambda job_id: polls.append(job_id) or updated_at(job_id)

    async def watch():
        seen = []
        events = jobs.events(job_id, poll_s=0.01)
        seen.append(await anext(events))  # where it stands
        consumer = asyncio.ensure_future(anext(events))
        for _ in range(3000):  # nothing changes: it only asks when the job last changed
            if len(polls) >= 20:
                break
            await asyncio.sleep(0.01)
        assert len(polls) >= 20 and len(reads) == 1 and not consumer.done(), (len(polls), reads, seen)
        segment = {"id": 0, "start": 0.0, "end": 2.0, "text": "And so, my fellow Americans"}
        await asyncio.to_thread(jobs.store.progress, job_id, claimed.lease_token, now=time.time(), stage="Transcribing with whisperx",
                                done_seconds=2.0, total_seconds=None, model="whisperx", warnings=[], segments=[segment], text=segment["text"])
        seen.append(await consumer)
        seen.append(await anext(events))
        await events.aclose()
        return seen

    seen = asyncio.run(watch())
    assert [e["type"] for e in seen] == ["transcript.progress", "transcript.text.delta", "transcript.text.segment"]
    assert len(reads) == 2 and seen[2]["text"] == "And so, my fellow Americans"


def test_the_uploads_held_are_bounded_and_a_refused_one_leaves_nothing(tmp_path, data_dir):
    audio = (data_dir / EN).read_bytes()
    jobs = service(tmp_path, max_media_bytes=2 * len(audio) + 10)
    first = submit(jobs, audio)
    submit(jobs, audio)
    assert jobs.store.media_bytes_held() == 2 * len(audio)
    with pytest.raises(JobsMediaFullError) as full:
        submit(jobs, audio)
    assert full.value.status == 429 and full.value.code == "jobs_media_full" and full.value.headers["Retry-After"]
    assert len(list((tmp_path / "media").iterdir())) == 2 and jobs.store.count("queued") == 2
    # a job that ended gives its room back
    asyncio.run(jobs.delete(first["id"]))
    assert jobs.store.media_bytes_held() == len(audio)
    assert submit(jobs, audio)["status"] == "queued"
