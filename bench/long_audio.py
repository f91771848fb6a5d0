"""Long recordings through the service: real-time factor, first segment, peak memory per replica.

    .venvs/ingress/bin/python bench/long_audio.py [--minutes 20,60,180] [--language de] [--record]

Builds each recording from the test clips of one language (tests/data, cycled, with a pause of
1.5 s between clips as between speakers), writes it as a 16-bit wav to a temporary file, and
sends it with `stream=true` to a cluster this script starts (the local config, as `make serve`
deploys it). Per recording it records:

- real-time factor: audio seconds / seconds from the first byte sent to the done event;
- first segment: seconds from the last byte of the upload sent to the first segment event;
- peak RSS of each replica and of Serve's HTTP proxy while it ran (Linux VmHWM, reset before
  each recording), with the part of the ingress's and the proxy's that is pages of Ray's object
  store (shared, counted by the store) after the run;
- that the cues are in order and cover the recording: every clip of 3 s or more has a cue.

The upload goes at `--upload-mbps` (MiB/s; 25, a fast office uplink, by default), as a client's
does. Serve's proxy reads a request body as fast as it comes and hands it on in batches, without
flow control: a body that arrives faster than the ingress spools it is held whole for a moment
in the proxy and the ingress. Each recording is therefore also sent once as fast as this machine
sends (loopback), leaving after the first progress event, and those peaks are recorded apart.

Memory is flat when the peaks do not grow with the length. `--language zh` goes to BELLE-2 (about
half WhisperX's speed on this CPU), anything else to WhisperX.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, md_table, record  # noqa: E402
from gpu_speed import base_config  # noqa: E402

from runtime_envs.local_cluster import LocalServeCluster  # noqa: E402

DATA = ROOT / "tests" / "data"
SAMPLE_RATE = 16000
PAUSE_S = 1.5
APPS = ("transcription", "belle2", "whisperx")


def clips_of(language: str) -> List[np.ndarray]:
    from serve_app.audio import decode_audio

    names = sorted(p.name for p in DATA.glob(f"{language}_*.flac"))
    if not names:
        raise SystemExit(f"No clips for {language!r} in {DATA}.")
    return [decode_audio((DATA / n).read_bytes(), max_seconds=3600) for n in names]


def build_recording(path: Path, clips: List[np.ndarray], minutes: float) -> List[Tuple[float, float]]:
    """Writes clips and pauses up to `minutes` as a 16 kHz 16-bit wav; returns each clip's span (s)."""
    target = int(minutes * 60 * SAMPLE_RATE)
    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)
    plan, total, i = [], 0, 0
    while total < target:
        clip = clips[i % len(clips)][: target - total]
        plan.append((clip, True))
        total += clip.size
        if total < target:
            plan.append((pause[: target - total], False))
            total += plan[-1][0].size
        i += 1
    spans, at = [], 0
    with open(path, "wb") as f:
        data_bytes = total * 2
        f.write(b"RIFF" + (36 + data_bytes).to_bytes(4, "little") + b"WAVE")
        f.write(b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
                + SAMPLE_RATE.to_bytes(4, "little") + (SAMPLE_RATE * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little"))
        f.write(b"data" + data_bytes.to_bytes(4, "little"))
        for part, is_clip in plan:
            if is_clip:
                spans.append((at / SAMPLE_RATE, (at + part.size) / SAMPLE_RATE))
            f.write((np.clip(part, -1, 1) * 32767).astype("<i2").tobytes())
            at += part.size
    return spans


class Upload:
    """A multipart body streamed from a file at `mbps` MiB/s (0: as fast as it goes), noting
    when its last byte was handed over."""

    def __init__(self, path: Path, mbps: float = 0, boundary: str = "klipnote-bench"):
        self.path, self.mbps, self.boundary = path, mbps, boundary
        self.started_at: Optional[float] = None
        self.sent_at: Optional[float] = None

    def __iter__(self) -> Iterator[bytes]:
        b = self.boundary
        yield (f"--{b}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n"
               f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{self.path.name}\"\r\n"
               "Content-Type: audio/wav\r\n\r\n").encode()
        self.started_at, sent = time.perf_counter(), 0
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 18):
                yield chunk
                sent += len(chunk)
                if self.mbps:
                    time.sleep(max(0.0, sent / (self.mbps * 2**20) - (time.perf_counter() - self.started_at)))
        yield f"\r\n--{b}--\r\n".encode()
        self.sent_at = time.perf_counter()

    def post(self, http: httpx.Client, url: str):
        return http.stream("POST", url, content=iter(self), headers={"Content-Type": f"multipart/form-data; boundary={self.boundary}"})


def proxy_pid() -> int:
    from ray.util.state import list_actors

    (proxy,) = [a.pid for a in list_actors(filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])]
    return proxy


def memory(reset: bool = False) -> dict:
    """`process_memory` of every replica (their `memory()` handle method) and of Serve's proxy."""
    from ray import serve

    from deployments.core import process_memory

    out = {app: serve.get_app_handle(app).memory.remote(reset).result(timeout_s=120) for app in APPS}
    return {**out, "proxy": process_memory(reset, pid=proxy_pid())}


def upload_burst(url: str, path: Path, audio_s: float) -> dict:
    """The upload as fast as loopback takes it; leaves after the first progress event."""
    memory(reset=True)
    upload = Upload(path)
    with httpx.Client(timeout=httpx.Timeout(60, read=None)) as http, upload.post(http, url) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "transcript.progress":
                break
    mem = memory()
    return {
        "minutes": round(audio_s / 60, 1),
        "upload MB": round(path.stat().st_size / 2**20),
        "upload s": round(upload.sent_at - upload.started_at, 2),
        **{f"peak {k} MB": round(mem[k]["peak_rss_bytes"] / 2**20) for k in ("transcription", "proxy")},
        **{f"{k} object-store pages MB": round(mem[k]["rss_shmem_bytes"] / 2**20) for k in ("transcription", "proxy")},
    }


def run_one(url: str, path: Path, spans: List[Tuple[float, float]], audio_s: float, mbps: float) -> dict:
    memory(reset=True)
    upload = Upload(path, mbps)
    started = time.perf_counter()
    first_segment_at, cues, done, errors = None, [], None, []
    with httpx.Client(timeout=httpx.Timeout(60, read=None)) as http:
        with upload.post(http, url) as r:
            if r.status_code != 200:
                raise SystemExit(f"{r.status_code}: {r.read()[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "transcript.text.segment":
                    first_segment_at = first_segment_at or time.perf_counter()
                    cues.append((event["start"], event["end"]))
                elif event["type"] == "transcript.text.done":
                    done = event
                elif event["type"] == "error":
                    errors.append(event["error"])
    wall = time.perf_counter() - started
    mem = memory()
    peaks = {app: m["peak_rss_bytes"] / 2**20 for app, m in mem.items()}
    in_order = all(a[0] <= b[0] and a[1] <= b[1] + 1e-6 for a, b in zip(cues, cues[1:]))
    uncovered = [s for s in spans if s[1] - s[0] >= 3 and not any(c[0] < s[1] and c[1] > s[0] for c in cues)]
    return {
        "minutes": round(audio_s / 60, 1),
        "model": (done or {}).get("model"),
        "rtf": round(audio_s / wall, 2),
        "first segment after upload s": round(first_segment_at - upload.sent_at, 1) if first_segment_at and upload.sent_at else None,
        **{f"peak {app} MB": round(v) for app, v in peaks.items()},
        **{f"{k} object-store pages MB": round(mem[k]["rss_shmem_bytes"] / 2**20) for k in ("transcription", "proxy")},
        "cues": len(cues),
        "in order": in_order,
        "clips without a cue": f"{len(uncovered)}/{sum(1 for s in spans if s[1] - s[0] >= 3)}",
        "errors": len(errors),
    }


def time_to_stop(url: str, path: Path, app: str) -> dict:
    """Seconds from a client leaving mid-recording to the model replica's decode stopping.

    The client reads the events until the first piece is done, goes on reading while the second
    reaches the model, then closes its socket (a raw one: the moment it leaves is exact).
    """
    from ray import serve

    handle = serve.get_app_handle(app)
    activity = lambda: handle.activity.remote().result(timeout_s=60)  # noqa: E731
    before = activity()
    upload = Upload(path)
    body = b"".join(upload)
    target = urlsplit(url)
    sock = socket.create_connection((target.hostname, target.port), timeout=600)
    sock.sendall((f"POST {target.path} HTTP/1.1\r\nHost: {target.hostname}\r\nContent-Type: multipart/form-data; boundary={upload.boundary}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    answer = b""
    while b"transcript.progress" not in answer:  # the first piece is done
        chunk = sock.recv(65536)
        if not chunk:
            return {"app": app, "disconnect to decode stopped s": None, "stopped by the cancel": f"the answer ended: {answer[-300:]!r}"}
        answer += chunk
    reading = threading.Thread(target=_read_until_closed, args=(sock,), daemon=True)
    reading.start()
    deadline = time.monotonic() + 120
    while not activity()["decoding"]:  # the second piece has reached the model: leave
        if time.monotonic() > deadline:
            return {"app": app, "disconnect to decode stopped s": None, "stopped by the cancel": "no second piece seen decoding"}
        time.sleep(0.05)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    left = time.perf_counter()
    while (now := activity())["decoding"]:
        if time.perf_counter() - left > 300:
            return {"app": app, "disconnect to decode stopped s": None, "stopped by the cancel": f"still decoding after 300 s: {now}"}
        time.sleep(0.1)
    stopped = time.perf_counter() - left
    after = activity()
    return {"app": app, "disconnect to decode stopped s": round(stopped, 2), "stopped by the cancel": after["cancelled"] - before["cancelled"] == 1}


def _read_until_closed(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:  # closed by the client leaving
        pass


@contextlib.contextmanager
def serving() -> Iterator[str]:
    """The transcription URL of a cluster this script starts, deployed as `make serve` does."""
    with LocalServeCluster(log_to_driver=False) as cluster:
        local, _ = base_config(cluster.http_port)
        cluster.deploy_applications(local)
        cluster.wait(APPS, timeout_s=1200)
        yield f"{cluster.url}/v1/audio/transcriptions"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", default="20,60,180", help="Recording lengths, comma-separated.")
    parser.add_argument("--language", default="de", help="Clips of this language (tests/data/<language>_*.flac).")
    parser.add_argument("--upload-mbps", type=float, default=25.0, help="Upload rate of the transcriptions, MiB/s (0: unthrottled).")
    parser.add_argument("--only-stop", action="store_true", help="Only the client leaving the shortest recording.")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)

    clips = clips_of(args.language)
    lengths = [float(m) for m in args.minutes.split(",")]
    if args.only_stop:
        return only_stop(args, clips, min(lengths))
    rows, bursts, stop = [], [], {}
    with tempfile.TemporaryDirectory() as tmp, serving() as url:
        httpx.post(url, files={"file": ("warm.flac", (DATA / "en_jfk.flac").read_bytes())}, timeout=600).raise_for_status()
        for minutes in lengths:
            path = Path(tmp) / f"recording_{minutes:g}min.wav"
            spans = build_recording(path, clips, minutes)
            row = run_one(url, path, spans, minutes * 60, args.upload_mbps)
            print(row, flush=True)
            rows.append(row)
            path.unlink()
        # After every transcription: the object-store pages a loopback upload maps stay in the
        # ingress's and the proxy's RSS, and would count in the next transcription's peak.
        for minutes in lengths:
            path = Path(tmp) / f"recording_{minutes:g}min.wav"
            build_recording(path, clips, minutes)
            bursts.append(upload_burst(url, path, minutes * 60))
            print(bursts[-1], flush=True)
            if minutes == min(lengths):
                stop = time_to_stop(url, path, rows[0]["model"])
                print(stop, flush=True)
            path.unlink()
    for table in (rows, bursts):
        for row in table:
            for name in [k[len("peak "):-len(" MB")] for k in row if k.startswith("peak ")]:
                row[f"{name} peak / shortest's"] = round(row[f"peak {name} MB"] / table[0][f"peak {name} MB"], 2)
    body = (f"Recordings of {args.language} clips from tests/data with {PAUSE_S} s pauses, 16 kHz 16-bit wav, uploaded at "
            f"{args.upload_mbps:g} MiB/s and sent with `stream=true`; default pieces (240 s, the first 30 s). Peak RSS per "
            f"replica and of Serve's proxy while each ran; flat memory means the peaks stay at the shortest recording's.\n\n"
            + md_table(rows)
            + "\n\nThe same uploads as fast as loopback takes them, the client leaving after the first progress event "
            "(the peaks of the ingress and the proxy while the body arrives):\n\n" + md_table(bursts)
            + "\n\nA client that leaves after the first piece of the shortest recording (the decode of the second "
            "piece stops at its next batch; no timing asserted in tests):\n\n" + md_table([stop]))
    print(body)
    if args.record:
        record(f"Long recordings ({args.minutes} min, {args.language})", body,
               command="python bench/long_audio.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


def only_stop(args, clips: List[np.ndarray], minutes: float) -> int:
    with tempfile.TemporaryDirectory() as tmp, serving() as url:
        path = Path(tmp) / f"recording_{minutes:g}min.wav"
        build_recording(path, clips, minutes)
        stop = time_to_stop(url, path, "belle2" if args.language == "zh" else "whisperx")
    body = (f"A client that reads the events of a {minutes:g}-minute recording ({args.language}) until its first piece "
            "is done, then closes its connection once the second piece is decoding (the decode stops at its next "
            "batch; no timing asserted in tests):\n\n" + md_table([stop]))
    print(body)
    if args.record:
        record(f"A client leaving a long recording ({minutes:g} min, {args.language})", body,
               command="python bench/long_audio.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
