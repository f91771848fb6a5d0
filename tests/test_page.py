"""The web page and the API docs as files and routes, without a cluster (fast): nothing they load
comes from outside the service, and API keys guard the API but not the page. The page itself
in a real browser against the live cluster: tests/test_web_page.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import List

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.guards import ApiKeys, RequireApiKey, is_open
from serve_app.page import DOCS_ASSETS, WEB_DIR, add_page_routes, page_html

EXTERNAL_URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.I)


class _References(HTMLParser):
    """The URLs an HTML page loads: script src, link href, img src."""

    def __init__(self):
        super().__init__()
        self.urls: List[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = attrs.get("src") if tag in ("script", "img", "audio", "video", "source") else attrs.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def references(html: str) -> List[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI(docs_url=None, redoc_url=None)
    add_page_routes(app)
    return TestClient(app)


def test_the_page_files_name_no_address_outside_the_service():
    files = sorted(p for p in WEB_DIR.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert {p.name for p in files} >= {"index.html", "app.js", "app.css"}
    for path in files:
        found = EXTERNAL_URL.findall(path.read_text())
        assert not found, f"{path.name} names {found}"


def test_the_page_loads_its_own_files_under_a_policy_that_allows_nothing_else(client):
    answer = client.get("/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert "base-uri 'self'" in policy  # 'none' would refuse the page's own <base>
    assert '<base href="/">' in answer.text
    urls = references(answer.text)
    assert "static/app.js" in urls and "static/app.css" in urls
    for url in (u for u in urls if not u.startswith("data:")):  # an inline favicon: no request at all
        assert not url.startswith("/"), f"{url}: not relative to the page's base (the app's route prefix)"
        assert client.get("/" + url).status_code == 200, url


def test_the_page_under_a_route_prefix_resolves_its_files_and_the_api_there():
    assert '<base href="/team-a/">' in page_html("/team-a")
    assert '<base href="/team-a/">' in page_html("/team-a/")
    assert '<base href="/a&quot;b/">' in page_html('/a"b')
    script = (WEB_DIR / "app.js").read_text()
    # Every API path in the script is relative to the base, none absolute.
    assert re.findall(r"[\"'`](v1/[a-z/]+)", script) and not re.findall(r"[\"'`]/v1/", script)


@pytest.mark.parametrize("path, assets", [("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))])
def test_the_api_docs_load_swagger_ui_and_redoc_from_the_service(client, path, assets):
    html = client.get(path).text
    assert not EXTERNAL_URL.findall(html), EXTERNAL_URL.findall(html)
    for name in assets:
        url = f"{DOCS_ASSETS}/{name}"
        assert url in html
        served = client.get(url)
        assert served.status_code == 200 and len(served.content) > 100_000, url  # the real bundle, not a stub
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_with_api_keys_the_page_and_docs_are_open_and_the_api_is_not():
    app = FastAPI(docs_url=None, redoc_url=None)
    add_page_routes(app)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    app.add_middleware(RequireApiKey)
    app.state.api_keys = ApiKeys(["page-test-key"])
    client = TestClient(app)
    for path in ("/", "/static/app.js", "/static/app.css", "/docs", "/redoc", f"{DOCS_ASSETS}/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 200, path
    refused = client.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer page-test-key"}).status_code == 200
    assert not is_open("/staticfiles") and not is_open("/v1/audio/transcriptions") and is_open("/static/app.js")


def test_the_ingress_serves_the_page_and_its_own_docs_not_fastapis_cdn_ones():
    from serve_app.app import api

    assert api.docs_url is None and api.redoc_url is None
    paths = {getattr(route, "path", None) for route in api.routes}
    assert {"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/static", DOCS_ASSETS} <= paths
