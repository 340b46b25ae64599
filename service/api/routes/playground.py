"""GET /: the playground, a page to try the served model in a browser, and its static files.

Plain HTML, CSS and JavaScript modules shipped inside the package (``service/static``): no CDN and
no build step, since a server often has no internet. The page reads everything else from the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
STATIC_URL = "/static"

# The page loads nothing from elsewhere: the browser enforces it, so a stray CDN link fails loudly.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# Revalidate every time (a 304 when unchanged): an upgraded server never runs with a stale script.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["playground"])


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    headers = {**NO_CACHE, "Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)


class _RevalidatedStaticFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def static_files() -> StaticFiles:
    return _RevalidatedStaticFiles(directory=STATIC_DIR)
