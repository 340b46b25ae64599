"""``POST /v1/classify`` without FastAPI's routing, middleware stack and dependency injection.

The single-pair route is the request that a server answers most, and on a small machine the event loop that runs
every request's Python is what saturates (bench/BENCHMARKS.md). FastAPI's share of it was a third: matching the
route, entering each layer of its middleware, and solving the route's dependencies (settings, the model leases,
the API key) with the machinery that also handles path, query, header, body and security parameters. This route
needs none of that: the same route function (``classify_one``) is called with its dependencies resolved here
directly, behind the same body-size limit, and every error is answered by the same functions as FastAPI's
exception handlers (service/errors.py). What the client sees does not change; tests/integration/test_fast_path.py
compares the two ways answer for answer.

Any other method, path or route goes to FastAPI as before, and so does ``/v1/classify`` while the app runs without
its front door (tests that build the app without ``create_app``).
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from service.api.routes.classify import ROUTER_CHECKS, classify_one
from service.errors import ApiError, api_error_response, client_gone_response, unexpected_error_response
from service.middleware import BodySizeLimit

PATH = "/v1/classify"


class FastClassify:
    def __init__(self, app, settings, metrics):
        self.app = app  # what ``request.app`` is to the route (its state: settings, repository)
        self.metrics = metrics
        self.limited = BodySizeLimit(
            self._classify,
            max_bytes=settings.max_body_bytes,
            metrics=metrics,
            drain_max_bytes=settings.drain_max_bytes,
            drain_timeout_s=settings.drain_timeout_s,
        )

    @staticmethod
    def handles(scope) -> bool:
        return scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST"

    async def __call__(self, scope, receive, send) -> None:
        await self.limited(scope, receive, send)

    async def _classify(self, scope, receive, send) -> None:
        scope["app"] = self.app
        request = Request(scope, receive)
        state = self.app.state
        settings = state.settings
        leases = state.repository.leases()
        try:
            for check in ROUTER_CHECKS:
                await check(request, settings)
            response = await classify_one(request, leases, settings)
        except ApiError as error:
            response = api_error_response(PATH, error, self.metrics.reject)
        except ClientDisconnect:
            response = client_gone_response(request, self.metrics.reject)
        except Exception as error:  # noqa: BLE001 - a server fault: logged and answered 500, as FastAPI's handler does
            response = unexpected_error_response(request, error)
        finally:
            leases.release()
        await response(scope, receive, send)
