"""Flower's HTTP middleware only on the requests it acts on.

Flower's SuperLink answers every request (each site's poll, each object of a message, each of the
ServerApp's) through nine Starlette `BaseHTTPMiddleware` layers, and a site's SuperNode answers its
worker through three; each layer costs a task group and a memory stream per request, whatever the
path. Four of the SuperLink's act only on the Control API (`/v1/control/`), two only on the Fleet
API (`/v1/fleet/`: the sites' authentication, and an event log only when an event-log plugin is
configured, which open-source Flower has none of), and one, on both servers, only when tracing is
on (FLWR_TRACING_ENABLED=1); their own `dispatch` hands every other request on unchanged. Here
each of those is skipped where its dispatch would hand the request on, so a site's request crosses
three layers instead of nine, the ServerApp's two, and a worker's two instead of three. Nothing is
skipped where a layer acts: the sites' authentication (NodeAuth) on every Fleet request, the Control
API's checks on every Control request, the protobuf and error translation everywhere.

FLOWER_MIDDLEWARE names the SuperLink's layers this was written against (flwr 1.41); a test fails
when Flower's list changes, so a new layer is never skipped unread.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

Scope = dict[str, Any]

CONTROL_PREFIX = "/v1/control/"
FLEET_PREFIX = "/v1/fleet/"
FLOWER_MIDDLEWARE = ("ControlSensitiveResponseMiddleware", "BaseHTTPMiddleware", "ControlAuthenticationMiddleware",
                     "ControlLicenseMiddleware", "ProtobufTranslationMiddleware", "RuntimeTracingMiddleware",
                     "ControlEventLogMiddleware", "NodeAuthMiddleware", "FleetEventLogMiddleware")


def control_api(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith(CONTROL_PREFIX)


def fleet_api(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith(FLEET_PREFIX)


def fleet_event_log(scope: Scope) -> bool:
    """Flower's FleetEventLogMiddleware writes only on Fleet requests, and only with a plugin."""
    app = scope.get("app")
    return fleet_api(scope) and getattr(getattr(app, "state", None), "fleet_event_log_plugin", None) is not None


def tracing_on(scope: Scope) -> bool:
    return os.getenv("FLWR_TRACING_ENABLED") == "1"  # read per request, as Flower's layer does


ONLY_WHERE = {"ControlSensitiveResponseMiddleware": control_api, "ControlAuthenticationMiddleware": control_api,
              "ControlLicenseMiddleware": control_api, "ControlEventLogMiddleware": control_api,
              "NodeAuthMiddleware": fleet_api, "FleetEventLogMiddleware": fleet_event_log,
              "RuntimeTracingMiddleware": tracing_on}


class OnlyWhere:
    """ASGI middleware: requests for which `applies(scope)` go through `middleware`, the others
    straight to the app (and anything that is not an HTTP request through `middleware`)."""

    def __init__(self, app: Any, middleware: Callable[..., Any], applies: Callable[[Scope], bool],
                 **kwargs: Any) -> None:
        self.app, self.applies = app, applies
        self.wrapped = middleware(app, **kwargs)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        target = self.wrapped if scope["type"] != "http" or self.applies(scope) else self.app
        await target(scope, receive, send)


def lean(middleware: list[Any]) -> list[Any]:
    """Flower's SuperLink middleware list with the layers of ONLY_WHERE skipped where they do not act."""
    from starlette.middleware import Middleware

    return [Middleware(OnlyWhere, middleware=m.cls, applies=ONLY_WHERE[m.cls.__name__], **m.kwargs)
            if m.cls.__name__ in ONLY_WHERE and not m.args else m for m in middleware]


def lean_superlink_middleware() -> None:
    """In the SuperLink process, before Flower builds its app."""
    from flwr.superlink import main

    original = main._get_middleware
    if not getattr(original, "_spine_fl_lean", False):
        main._get_middleware = lambda: lean(original())  # type: ignore[attr-defined]
        main._get_middleware._spine_fl_lean = True  # type: ignore[attr-defined]


def lean_supernode_middleware() -> None:
    """In the SuperNode process, before Flower builds its Runtime API app (its tracing layer)."""
    from flwr.supernode import main

    if not isinstance(main.RuntimeTracingMiddleware, partial):
        main.RuntimeTracingMiddleware = partial(OnlyWhere, middleware=main.RuntimeTracingMiddleware,
                                                applies=tracing_on)
