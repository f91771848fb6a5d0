"""The web page (`serve_app/web/`, at `/`) and the API docs (`/docs`, `/redoc`), served from the
ingress with no request leaving it: deployments are often offline, and FastAPI's own docs
pages load Swagger UI and ReDoc from a CDN (blank pages without one). Their files come from
the `fastapi-offline` package (Swagger UI: Apache-2.0, ReDoc: MIT, the package: MIT).
"""

from __future__ import annotations

import html
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from serve_app.admission import route_prefix

WEB_DIR = Path(__file__).with_name("web")
DOCS_ASSETS_DIR = Path(str(resources.files("fastapi_offline") / "static"))
DOCS_ASSETS = "/static/docs"
PAGE_FILES = "/static"
BASE_TAG = '<base href="/">'

PAGE_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)
"""The page may load and call nothing but this service (and play the local file it was given)."""

DOCS_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'"
)
"""Swagger UI and ReDoc start from an inline script, and ReDoc's sidebar shows a logo from
cdn.redoc.ly: refused here, it is hidden (its onError) and nothing leaves the network."""


def add_page_routes(api: FastAPI) -> None:
    """`/`, its files under `/static/`, and the offline `/docs`, `/docs/oauth2-redirect` and
    `/redoc` on `api` (built with `docs_url=None, redoc_url=None`)."""
    # The more specific mount first: Starlette takes the first that matches.
    api.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    api.mount(PAGE_FILES, StaticFiles(directory=WEB_DIR), name="page-files")

    @api.get("/", include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(
            page_html(route_prefix(request.scope)),
            headers={"Content-Security-Policy": PAGE_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    @api.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = route_prefix(request.scope).rstrip("/")
        return _with_policy(get_swagger_ui_html(
            openapi_url=root + api.openapi_url,
            title=f"{api.title} - API docs",
            oauth2_redirect_url=root + "/docs/oauth2-redirect",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        ))

    @api.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @api.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = route_prefix(request.scope).rstrip("/")
        return _with_policy(get_redoc_html(
            openapi_url=root + api.openapi_url,
            title=f"{api.title} - API reference",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        ))


def page_html(root_path: str) -> str:
    """index.html with its `<base>` at the app's route prefix (Serve's root_path), so the page's
    relative URLs (its files, the API) stay inside the app wherever it is mounted."""
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return (WEB_DIR / "index.html").read_text(encoding="utf-8").replace(BASE_TAG, f'<base href="{base}">', 1)


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_SECURITY_POLICY
    return page
