"""Webhook notifications (fast, no cluster): the callback URL check, signatures, and deliveries
over real HTTP to a receiver on 127.0.0.1 that answers with scripted status codes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from serve_app.jobs.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    CallbackURLError,
    WebhookSettings,
    check_callback_url,
    deliver,
    payload_for,
    sign,
    verify,
)

SECRET = "whsec_test_0123456789"
NOW = 1_750_000_000.0


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every request and answers with `script`.

    Attributes:
        script: Status codes to answer POSTs with, in order; the last one repeats.
        requests: Each request received: method, path, headers (lower-case names), body.
    """

    def __init__(self, tls: Optional[ssl.SSLContext] = None):
        self.script: List[int] = [200]
        self.requests: List[Dict] = []
        self.server_names: List[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver.requests.append({
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": self.rfile.read(length),
                })

            def do_POST(self):
                self._record()
                status = receiver.script.pop(0) if len(receiver.script) > 1 else receiver.script[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def settings(**overrides) -> WebhookSettings:
    values = {"secret": SECRET, "allow_private": True, "max_attempts": 6, "backoff_s": 2.0, "max_backoff_s": 300.0,
              "timeout_s": 5.0}
    values.update(overrides)
    return WebhookSettings(**values)


def job_payload(status: str = "succeeded") -> dict:
    return payload_for(
        "job_01", status, links={"self": "/v1/audio/transcriptions/jobs/job_01",
                                 "result": "/v1/audio/transcriptions/jobs/job_01/result"},
        created_at=NOW - 30.7, finished_at=NOW - 0.2, error=None, model="belle2",
    )


def attempt(url: str, settings_: WebhookSettings, number: int, *, status: str = "succeeded",
            payload: Optional[dict] = None, now: float = NOW):
    return asyncio.run(deliver(
        url, payload or job_payload(status), event=f"job.{status}", delivery_id=f"job_01:{status}",
        settings=settings_, attempt=number, now=now,
    ))


# --- The URL check ----------------------------------------------------------------------------

def test_accepts_a_public_https_url_without_resolving():
    assert check_callback_url("  https://example.com/hook?x=1  ", allow_private=False, resolve=False) == "https://example.com/hook?x=1"
    assert check_callback_url("http://8.8.8.8:8080/h", allow_private=False) == "http://8.8.8.8:8080/h"
    assert check_callback_url("http://[2606:4700:4700::1111]/h", allow_private=False) == "http://[2606:4700:4700::1111]/h"
    # IPv6 forms of a public IPv4 address are judged by that address.
    assert check_callback_url("http://[::ffff:8.8.8.8]/h", allow_private=False) == "http://[::ffff:8.8.8.8]/h"
    assert check_callback_url("http://[64:ff9b::808:808]/h", allow_private=False) == "http://[64:ff9b::808:808]/h"


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/hook", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("example.com/hook", "scheme"),
    ("http://", "host"),
    ("https:///hook", "host"),
    ("https://user:pass@example.com/hook", "host"),
    ("https://user@example.com/hook", "host"),
    ("https://example.com@127.0.0.1/hook", "host"),
    ("https://example.com\\@127.0.0.1/hook", "host"),
    ("https://exa mple.com/hook", "host"),
    ("https://example.com:99999/hook", "host"),
    ("https://example.com/" + "a" * 2048, "host"),
    ("http://127.0.0.1/", "private_address"),
    ("http://127.0.0.1:8000/hook", "private_address"),
    ("http://10.0.0.1", "private_address"),
    ("http://192.168.1.20/hook", "private_address"),
    ("http://172.16.0.1/hook", "private_address"),
    ("http://100.64.0.1/hook", "private_address"),
    ("http://169.254.169.254/latest/meta-data/", "private_address"),
    ("http://[::1]/", "private_address"),
    ("http://[::ffff:127.0.0.1]/", "private_address"),
    ("http://[::ffff:169.254.169.254]/", "private_address"),
    ("http://[64:ff9b::7f00:1]/", "private_address"),
    ("http://[2002:7f00:1::]/", "private_address"),
    ("http://[fe80::1]/", "private_address"),
    ("http://[fd00::1]/", "private_address"),
    ("http://0.0.0.0/", "private_address"),
    ("http://224.0.0.1/", "private_address"),
    ("http://[ff02::1]/", "private_address"),
    ("http://240.0.0.1/", "private_address"),
    ("http://255.255.255.255/", "private_address"),
    # Spellings of 127.0.0.1 that the C resolver (and so the HTTP client) reads as that address.
    ("http://2130706433/", "private_address"),
    ("http://0x7f000001/", "private_address"),
    ("http://127.1/", "private_address"),
    ("http://127.0.0.1./", "private_address"),
])
def test_refuses_with_a_stable_reason(url, reason):
    with pytest.raises(CallbackURLError) as refused:
        check_callback_url(url, allow_private=False, resolve=False)
    assert refused.value.reason == reason
    assert isinstance(refused.value, ValueError)


def test_a_name_is_judged_by_what_it_resolves_to():
    # Without resolving, a name passes; resolved, localhost is loopback.
    assert check_callback_url("http://localhost:8000/hook", allow_private=False, resolve=False)
    with pytest.raises(CallbackURLError) as refused:
        check_callback_url("http://localhost:8000/hook", allow_private=False)
    assert refused.value.reason == "private_address"
    assert check_callback_url("http://localhost:8000/hook", allow_private=True) == "http://localhost:8000/hook"


def test_an_unresolvable_name_is_refused():
    # .invalid never resolves (RFC 6761).
    with pytest.raises(CallbackURLError) as refused:
        check_callback_url("https://receiver.invalid/hook", allow_private=False)
    assert refused.value.reason == "unresolvable"


def test_private_addresses_pass_when_allowed():
    assert check_callback_url("http://127.0.0.1:9/hook", allow_private=True) == "http://127.0.0.1:9/hook"
    assert check_callback_url("http://[::1]/hook", allow_private=True) == "http://[::1]/hook"
    # Allowing private addresses does not allow other schemes or userinfo.
    with pytest.raises(CallbackURLError):
        check_callback_url("ftp://127.0.0.1/", allow_private=True)
    with pytest.raises(CallbackURLError):
        check_callback_url("http://a:b@127.0.0.1/", allow_private=True)


def test_every_address_of_a_name_must_be_public(monkeypatch):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "mixed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(CallbackURLError) as refused:
        check_callback_url("https://mixed.test/hook", allow_private=False)
    assert refused.value.reason == "private_address"


# --- Signatures -------------------------------------------------------------------------------

def test_sign_and_verify():
    body = '{"id":"job_01","status":"succeeded","note":"字幕"}'.encode()
    header = sign(body, SECRET, int(NOW))
    assert header.startswith(f"t={int(NOW)},v1=")
    assert verify(body, header, SECRET, now=NOW + 10)
    assert not verify(body, header, "another secret", now=NOW)
    assert not verify(body.replace(b"succeeded", b"failed"), header, SECRET, now=NOW)
    assert not verify(body, header, SECRET, now=NOW + 301)  # a replay, too late
    assert not verify(body, header.replace(f"t={int(NOW)}", f"t={int(NOW) + 1}"), SECRET, now=NOW)
    for broken in ("", "v1=abc", f"t={int(NOW)}", "t=x,v1=abc", f"t={int(NOW)},t={int(NOW)},v1=00"):
        assert not verify(body, broken, SECRET, now=NOW)
    # A second v1 (the old secret's, during a rotation) does not spoil a valid one.
    assert verify(body, f"{header},v1={'0' * 64}", SECRET, now=NOW)


def test_settings_refuse_an_empty_secret():
    with pytest.raises(ValueError):
        WebhookSettings(secret="")
    with pytest.raises(ValueError):
        WebhookSettings(secret=None, max_attempts=0)


# --- Deliveries over HTTP ---------------------------------------------------------------------

def test_delivered_signed_with_the_payload(receiver):
    payload = job_payload()
    now = time.time()
    result = attempt(receiver.url, settings(), 1, payload=payload, now=now)
    assert (result.delivered, result.status_code, result.error, result.next_at) == (True, 200, None, None)

    [request] = receiver.requests
    assert (request["method"], request["path"]) == ("POST", "/hook?token=abc")
    headers, body = request["headers"], request["body"]
    assert json.loads(body.decode("utf-8")) == payload
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "KlipNote-Webhooks/1"
    assert headers[DELIVERY_HEADER.lower()] == "job_01:succeeded"
    assert headers[EVENT_HEADER.lower()] == "job.succeeded"
    signature = headers[SIGNATURE_HEADER.lower()]
    assert verify(body, signature, SECRET, now=time.time())
    assert not verify(body, signature, "wrong secret", now=time.time())
    assert not verify(body.replace(b"job_01", b"job_02"), signature, SECRET, now=time.time())


def test_body_is_compact_utf8_json(receiver):
    payload = job_payload("failed")
    payload["error"] = {"code": "invalid_audio", "message": "音频无法解码"}
    assert attempt(receiver.url, settings(), 1, status="failed", payload=payload).delivered
    body = receiver.requests[0]["body"]
    assert "音频无法解码".encode() in body
    assert b", " not in body and b": " not in body
    assert receiver.requests[0]["headers"][EVENT_HEADER.lower()] == "job.failed"


def test_unsigned_without_a_secret(receiver):
    result = attempt(receiver.url, settings(secret=None), 1)
    assert result.delivered
    headers = receiver.requests[0]["headers"]
    assert SIGNATURE_HEADER.lower() not in headers
    assert headers[DELIVERY_HEADER.lower()] == "job_01:succeeded"


def test_retried_with_doubling_backoff_until_delivered(receiver):
    receiver.script = [500, 500, 200]
    config = settings()
    first = attempt(receiver.url, config, 1)
    assert (first.delivered, first.status_code, first.error, first.next_at) == (False, 500, "HTTP 500", NOW + 2)
    second = attempt(receiver.url, config, 2)
    assert (second.delivered, second.status_code, second.next_at) == (False, 500, NOW + 4)
    third = attempt(receiver.url, config, 3)
    assert (third.delivered, third.status_code, third.next_at) == (True, 200, None)

    assert len(receiver.requests) == 3
    assert {r["headers"][DELIVERY_HEADER.lower()] for r in receiver.requests} == {"job_01:succeeded"}
    assert len({r["body"] for r in receiver.requests}) == 1


def test_backoff_is_capped():
    # No receiver needed: a refused connection is retried on the same schedule.
    config = settings(backoff_s=2.0, max_backoff_s=10.0, max_attempts=10)
    url = f"http://127.0.0.1:{closed_port()}/hook"
    assert [attempt(url, config, n).next_at - NOW for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def test_attempts_are_bounded(receiver):
    receiver.script = [500]
    config = settings(max_attempts=3)
    results = [attempt(receiver.url, config, n) for n in (1, 2, 3)]
    assert [r.next_at is not None for r in results] == [True, True, False]
    assert not any(r.delivered for r in results)
    assert results[-1].error == "HTTP 500"
    assert len(receiver.requests) == 3


def test_client_errors_are_retried_too(receiver):
    receiver.script = [404]
    result = attempt(receiver.url, settings(), 1)
    assert (result.delivered, result.status_code, result.next_at) == (False, 404, NOW + 2)


def test_a_redirect_is_not_followed(receiver):
    receiver.script = [302, 200]
    result = attempt(receiver.url, settings(), 1)
    assert (result.delivered, result.status_code, result.error) == (False, 302, "HTTP 302")
    assert result.next_at == NOW + 2
    assert [r["path"] for r in receiver.requests] == ["/hook?token=abc"]


def test_a_refused_address_is_refused_for_good(receiver):
    result = attempt(receiver.url, settings(allow_private=False), 1)
    assert (result.delivered, result.status_code, result.next_at) == (False, None, None)
    assert result.error.startswith("refused")
    assert result.error == "refused: private_address"
    assert receiver.requests == []


def test_a_name_rebound_to_loopback_after_submission_is_refused(receiver, monkeypatch):
    # The name resolved to a public address when the job was submitted, and to the receiver's
    # loopback address when the notification is due.
    real = socket.getaddrinfo
    answers = {"rebind.test": "93.184.216.34"}

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://rebind.test:{receiver.port}/hook"
    assert check_callback_url(url, allow_private=False) == url
    answers["rebind.test"] = "127.0.0.1"
    result = attempt(url, settings(allow_private=False), 1)
    assert (result.delivered, result.next_at, result.error) == (False, None, "refused: private_address")
    assert receiver.requests == []


def test_the_checked_address_is_the_one_connected_to(receiver, monkeypatch):
    # pinned.test resolves only through this fake: had the HTTP client resolved the name itself
    # (after the check), the request could not have reached the receiver.
    real = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "pinned.test":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    result = attempt(f"http://pinned.test:{receiver.port}/hook", settings(), 1)
    assert result.delivered, result
    assert lookups == ["pinned.test"]
    assert receiver.requests[0]["headers"]["host"] == f"pinned.test:{receiver.port}"
    assert receiver.requests[0]["path"] == "/hook"


def certificate(tmp_path: Path, name: str) -> Path:
    """A self-signed certificate (and its key) for the DNS name `name`, as one PEM file."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("certified_name, delivered", [("pinned.test", True), ("other.test", False)])
def test_https_to_a_checked_address_verifies_the_host_name(tmp_path, monkeypatch, certified_name, delivered):
    # Connecting to the checked address must not weaken TLS: the server name sent and the
    # certificate verified are still the URL's host's, not the address's.
    import httpx

    pem = certificate(tmp_path, certified_name)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pem)
    receiver = Receiver(tls=server_context)
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "pinned.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def run():
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pem))) as client:
            return await deliver(f"https://pinned.test:{receiver.port}/hook", job_payload(), event="job.succeeded",
                                 delivery_id="job_01:succeeded", settings=settings(), attempt=1, now=NOW, client=client)

    try:
        result = asyncio.run(run())
    finally:
        receiver.close()
    assert result.delivered is delivered, result
    assert receiver.server_names == ["pinned.test"]
    if delivered:
        assert receiver.requests[0]["headers"]["host"] == f"pinned.test:{receiver.port}"
    else:
        assert receiver.requests == [] and result.next_at == NOW + 2
        assert result.error == "certificate verification failed"


def test_an_unresolvable_host_is_retried():
    result = attempt("https://receiver.invalid/hook", settings(allow_private=False), 1)
    assert (result.delivered, result.error, result.next_at) == (False, "unresolvable", NOW + 2)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_retried():
    result = attempt(f"http://127.0.0.1:{closed_port()}/hook", settings(), 1)
    assert (result.delivered, result.status_code, result.next_at) == (False, None, NOW + 2)
    assert result.error == "connection refused"


def test_a_receiver_that_never_answers_times_out():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections (the kernel does) but never answers
        started = time.monotonic()
        result = attempt(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", settings(timeout_s=0.5), 1)
    assert time.monotonic() - started < 5
    assert (result.delivered, result.error, result.next_at) == (False, "timeout", NOW + 2)


def test_a_given_client_is_used_and_left_open(receiver):
    import httpx

    async def run():
        async with httpx.AsyncClient() as client:
            first = await deliver(receiver.url, job_payload(), event="job.succeeded", delivery_id="job_01:succeeded",
                                  settings=settings(), attempt=1, now=NOW, client=client)
            assert not client.is_closed
            second = await deliver(receiver.url, job_payload(), event="job.succeeded",
                                   delivery_id="job_01:succeeded", settings=settings(), attempt=2, now=NOW,
                                   client=client)
            return first, second

    first, second = asyncio.run(run())
    assert first.delivered and second.delivered
    assert len(receiver.requests) == 2


# --- The payload ------------------------------------------------------------------------------

def test_payload_holds_no_transcript_and_whole_seconds():
    payload = payload_for("job_01", "succeeded", links={"self": "/v1/audio/transcriptions/jobs/job_01"},
                          created_at=1_700_000_000.9, finished_at=1_700_000_042.5, error=None, model="whisperx")
    assert set(payload) == {"id", "object", "status", "created_at", "finished_at", "model", "error", "links"}
    assert not {"text", "segments", "words", "result"} & set(payload)
    assert payload["object"] == "transcription.job"
    assert (payload["created_at"], payload["finished_at"]) == (1_700_000_000, 1_700_000_042)
    assert type(payload["created_at"]) is int and type(payload["finished_at"]) is int
    assert payload["error"] is None and payload["model"] == "whisperx"
    unfinished = payload_for("job_02", "failed", links={}, created_at=1.0, finished_at=None,
                             error={"code": "x", "message": "y"}, model=None)
    assert unfinished["finished_at"] is None and unfinished["error"] == {"code": "x", "message": "y"}
