"""HTTP API and web page over a :class:`~fashionhash.serving.service.SearchService`.

``create_app(service)`` returns the FastAPI app (tests use it with a small index);
``serve(run_dir, index_path, ...)`` loads the service once and runs it with uvicorn.

Endpoints (errors are JSON ``{"error": message}`` with a 4xx status; the server keeps serving):

=========================  ======================================================
``GET /``                  the web page (static files under ``/static``)
``POST /search``           multipart: ``image`` (JPEG/PNG/WebP; GIF: first frame), ``k``, filters
``GET /items``             ``offset``, ``limit``, filters: a page of the catalogue
``GET /items/{id}``        one item
``GET /items/{id}/similar``  ``k``, filters: nearest items to the item's stored code
``POST /items``            bearer token; multipart ``image`` + attribute fields: add
``DELETE /items/{id}``     bearer token: remove
``GET /images/{id}``       the item's photo (catalogue folder or index uploads only)
``GET /facets``            values of the page's filter attributes, with counts
``GET /health``            liveness
``GET /stats``             index size, bits, backend, the run that made the codes
=========================  ======================================================

Filters are query parameters (GET) or form fields (POST) named after attributes; a
repeated name means "any of"; empty values are ignored; unknown names are a 400.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .service import BadRequest, NotFound, SearchService, ServiceConfig, ServiceError, TooLarge

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: multipart overhead allowed on top of the photo (boundaries, headers, attribute fields)
FORM_OVERHEAD = 64 * 1024
#: query/form names that are parameters, not attribute filters
_PARAMS = {"k", "offset", "limit"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with a 413, without
    reading more than that: at once from ``Content-Length``, else by counting the chunks
    as the app receives them (chunked uploads) and stopping at the limit."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"request body over the limit of {self.limit:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.limit:
                        await self._refuse(send)
                        return
                except ValueError:
                    pass
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            if state["over"]:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                return  # the app's answer to the aborted body (e.g. a parse error) is dropped
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await self._refuse(send)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _json(data: Any, status: int = 200) -> Response:
    """The service's dicts are JSON-ready: skip FastAPI's (slow, recursive) encoder."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json")


def _filters(pairs) -> dict[str, list[str]]:
    """Attribute filters from query parameters or form fields (multi-valued)."""
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        if key in _PARAMS or not isinstance(value, str):
            continue
        out.setdefault(key, []).append(value)
    return out


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None


def _item_id(raw: str) -> int:
    """A path id; anything that is not a plain non-negative integer is not an item."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise NotFound(f"no item {raw!r}")
    return int(raw)


async def _read_upload(request: Request, service: SearchService) -> tuple[bytes, dict[str, Any]]:
    """The uploaded photo (form field ``image`` or ``file``) and the other form fields."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data with the photo in the field 'image'")
    try:
        form = await request.form(max_files=2, max_fields=64, max_part_size=FORM_OVERHEAD)
    except _BodyTooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - malformed multipart from python-multipart/starlette
        raise BadRequest(f"malformed multipart body: {e}") from None
    try:
        upload = form.get("image") or form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("no photo: send it as the multipart file field 'image'")
        limit = service.config.max_upload_bytes
        data = await upload.read(limit + 1)  # never more than the limit plus one byte
        if len(data) > limit:
            raise TooLarge(f"upload over the limit of {limit:,} bytes")
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("image", "file") or not isinstance(value, str):
                continue
            fields.setdefault(key, []).append(value)
        return data, fields
    finally:
        await form.close()  # spooled temporary files of big uploads


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _authorise(request: Request, service: SearchService) -> JSONResponse | None:
    """None when the request carries the write token; else the error response."""
    if not service.config.token:
        return _error(403, "writes are disabled: start the server with a token (--token or FASHIONHASH_TOKEN)")
    if not service.check_token(_bearer(request)):
        return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    return None


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app over ``service`` (loaded once, shared by every request)."""
    app = FastAPI(title="fashionhash", description="Visual search over learned binary codes",
                  docs_url="/docs", redoc_url=None)
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg")) for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    # -- page ------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- reads -----------------------------------------------------------------------
    # Index lookups take about a millisecond: they run on the event loop, which is cheaper
    # than a hop to the thread pool. Slower work (photo encoding, facets) runs in threads.

    @app.get("/health")
    async def health() -> Response:
        return _json(service.health())

    @app.get("/stats")
    async def stats() -> Response:
        return _json(service.stats())

    @app.get("/facets")
    async def facets() -> Response:
        return _json(await run_in_threadpool(service.facets))

    @app.get("/items")
    async def list_items(request: Request) -> Response:
        q = request.query_params
        return _json(service.list_items(_int(q.get("offset"), "offset", 0), _int(q.get("limit"), "limit", 48),
                                        _filters(q.multi_items())))

    @app.get("/items/{item_id}")
    async def get_item(item_id: str) -> Response:
        return _json(service.get_item(_item_id(item_id)))

    @app.get("/items/{item_id}/similar")
    async def similar(item_id: str, request: Request) -> Response:
        q = request.query_params
        return _json(service.similar(_item_id(item_id), q.get("k", "10"), _filters(q.multi_items())))

    @app.get("/images/{item_id}")
    def image(item_id: str) -> Response:
        path, data, media_type = service.image(_item_id(item_id))
        headers = {"Cache-Control": "public, max-age=3600"}
        if path is not None:
            return FileResponse(path, media_type=media_type, headers=headers)
        return Response(data, media_type=media_type, headers=headers)

    @app.post("/search")
    async def search(request: Request) -> Response:
        data, fields = await _read_upload(request, service)
        k = fields.pop("k", ["10"])[-1]
        return _json(await run_in_threadpool(service.search_image, data, k, _filters(
            (key, v) for key, values in fields.items() for v in values)))

    # -- writes ----------------------------------------------------------------------

    @app.post("/items", status_code=201)
    async def add_item(request: Request) -> Any:
        denied = _authorise(request, service)  # before reading any of the body
        if denied is not None:
            return denied
        data, fields = await _read_upload(request, service)
        attrs: dict[str, Any] = {}
        if "attributes" in fields:  # optional JSON object, for API clients
            try:
                parsed = json.loads(fields.pop("attributes")[-1])
            except ValueError:
                raise BadRequest("attributes must be a JSON object") from None
            if not isinstance(parsed, dict):
                raise BadRequest("attributes must be a JSON object")
            attrs.update(parsed)
        attrs.update({key: values[-1] for key, values in fields.items()})
        return _json(await run_in_threadpool(service.add_item, data, attrs), 201)

    @app.delete("/items/{item_id}")
    async def delete_item(item_id: str, request: Request) -> Response:
        denied = _authorise(request, service)
        if denied is not None:
            return denied
        return _json(await run_in_threadpool(service.delete_item, _item_id(item_id)))

    app.add_middleware(BodyLimit, limit=service.config.max_upload_bytes + FORM_OVERHEAD)
    return app


def serve(
    run_dir: str | os.PathLike | None,
    index_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    max_upload_bytes: int = ServiceConfig.max_upload_bytes,
    two_stage: bool = ServiceConfig.two_stage,
    shortlist: int = ServiceConfig.shortlist,
    photo_batch: int = ServiceConfig.photo_batch,
    log_level: str = "info",
) -> None:
    """Load the run and the index once and serve the API + page until interrupted.

    ``token`` (default ``$FASHIONHASH_TOKEN``) enables ``POST /items`` and
    ``DELETE /items/{id}``; without one the index is read-only over HTTP. ``two_stage``,
    ``shortlist`` and ``photo_batch``: see :class:`ServiceConfig` (a smaller shortlist
    answers faster)."""
    import uvicorn

    token = token if token is not None else os.environ.get("FASHIONHASH_TOKEN") or None
    service = SearchService.open(run_dir, index_path,
                                 ServiceConfig(token=token, max_upload_bytes=max_upload_bytes,
                                               two_stage=two_stage, shortlist=shortlist,
                                               photo_batch=photo_batch))
    service.warmup()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, access_log=False)
    finally:
        service.close()
