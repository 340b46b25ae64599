"""The playground (GET /) and the offline API docs as the server sends them; tests/unit/test_playground_files.py
checks the files themselves and tests/e2e/test_playground.py drives them in a real browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"
EXTERNAL_URL = re.compile(r"https?://", re.IGNORECASE)
PAGES = ("/", "/docs", "/redoc")


@pytest.fixture(scope="module")
def client(tiny_store):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(store=tiny_store))) as client:
        yield client


def local_references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_the_page_is_served_with_a_policy_that_forbids_loading_from_elsewhere(client):
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "<title>dynfuse playground</title>" in response.text


def test_every_script_stylesheet_and_module_the_page_loads_is_served(client):
    page = client.get("/").text
    wanted = [ref for ref in local_references(page) if ref.startswith("static/")]
    modules = {
        f"static/{name}"
        for path in STATIC.glob("*.js")
        for name in re.findall(r'from "\./([\w.-]+)"', path.read_text())
    }

    assert "static/app.js" in wanted
    assert "static/playground.css" in wanted
    for reference in sorted(set(wanted) | modules):
        response = client.get(f"/{reference}")
        assert response.status_code == 200, reference
        expected = "text/javascript" if reference.endswith(".js") else "text/css"
        assert response.headers["content-type"].startswith(expected), reference  # modules need a JS type
        assert response.headers["cache-control"] == "no-cache"  # an upgraded server never runs a stale script


def test_no_served_page_references_an_external_url(client):
    served = {path: client.get(path).text for path in PAGES}
    served |= {f"/static/{p.name}": client.get(f"/static/{p.name}").text for p in STATIC.iterdir()}

    for path, text in served.items():
        assert EXTERNAL_URL.findall(text) == [], f"{path} references an outside URL"
    for path in PAGES:
        for reference in local_references(served[path]):
            local = reference.startswith(("/", "#", "static/", "data:")) or reference in {"docs", "redoc", "metrics"}
            assert local, f"{path}: {reference}"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_their_assets_from_this_server(client, page):
    html = client.get(page).text
    assets = [ref for ref in local_references(html) if ref.startswith("/docs-assets/")]

    assert len(assets) >= 2  # a script and an icon, and Swagger UI's stylesheet
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 1000, asset
    assert "/openapi.json" in html
    assert "fonts.googleapis" not in html
    assert "default-src 'self'" in client.get(page).headers["content-security-policy"]


def test_the_docs_pages_are_not_in_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc"} & set(paths)
    assert "/v1/models/{name}/examples/{example_id}" in paths
