"""The identification web service (FastAPI + uvicorn); the API is ``docs``' serve contract.

:func:`create_app` loads a trained run's checkpoint and the service's reference index
(:class:`~chlib.serve.library.ReferenceLibrary`) once; :func:`serve` runs it with uvicorn on
127.0.0.1 by default. Requests are served concurrently; uploads are streamed to
``<run_dir>/service/tmp/`` within :class:`~chlib.serve.limits.Limits` and decoded in worker
processes, the model embeds for one request at a time (a lock), and a search uses the index
snapshot it started with while edits (token required) build the next one."""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from starlette.concurrency import run_in_threadpool

from chlib.core.errors import ChlibError
from chlib.core.io import file_sha256, json_safe, load_npy
from chlib.retrieval import evaluate
from chlib.retrieval.embed import embed_windows
from chlib.retrieval.identify import verdict
from chlib.retrieval.segment import feature_timeline
from chlib.serve import AUDIO_TYPES, Limits, ServeError, sniff_audio
from chlib.serve.library import ReferenceLibrary, check_perf, clean_work, load_token
from chlib.serve.limits import DecodePool, receive_upload

__all__ = ["Service", "create_app", "serve"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MATCH_KEYS = ("rank", "work", "work_id", "perf", "distance", "p_value", "verdict")
_STALE_UPLOAD_S = 3600.0  # an upload file older than this at start-up was abandoned
_PNG_FRAMES = 1500  # frames drawn per panel at most (longer CQTs are thinned)
_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}
_REF_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "work"], "properties": {
        "file": {"type": "string", "format": "binary"}, "work": {"type": "string"},
        "perf": {"type": "string"}}}}}}}


class Service:
    """A loaded run: model, settings, reference library, decoder pool, limits and token."""

    def __init__(self, run_dir: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None,
                 checkpoint: str | int = "best", device: str = "auto", token: str | None = None,
                 limits: Limits | None = None, decode_workers: int = 2) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.limits = limits or Limits()
        self.model, self.hp, self.epoch, self.note = evaluate.load_checkpoint(
            self.run_dir, checkpoint, device)
        self.device = next(self.model.parameters()).device
        dataset = Path(dataset_dir) if dataset_dir else self.hp.resolve_path(
            self.hp.train_path).parent
        self.dir = self.run_dir / "service"
        self.tmp_dir = self.dir / "tmp"
        for old in self.tmp_dir.glob("upload-*.part"):  # left by a killed server
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > _STALE_UPLOAD_S:
                    old.unlink()
        self.model_lock = threading.Lock()
        self.library = ReferenceLibrary(self.dir, self.model, self.hp, dataset,
                                        model_lock=self.model_lock, device=self.device)
        self.token = load_token(self.dir, token)
        self.pool = DecodePool(decode_workers)

    def health(self) -> dict:
        idx = self.library.index
        return {"status": "ok", "run": self.run_dir.name, "epoch": int(self.epoch),
                "n_works": len(set(idx.works)), "n_references": len(idx),
                "max_upload_mb": float(self.limits.max_upload_mb),
                "max_duration_s": float(self.limits.max_duration_s),
                "can_edit": self.token is not None}

    def identify(self, path: Path, name: str, *, top_k: int, with_timeline: bool) -> dict:
        """The contract's /identify answer for an audio file (decoded by the pool): the top-k
        works as :func:`chlib.retrieval.identify.identify` ranks them (the same embedding,
        search and verdicts, on the features decoded once) and the timeline as
        :func:`chlib.retrieval.segment.identify_segments` decodes it."""
        feat, duration = self.pool.decode(path, self.hp.features, self.limits)
        idx, nulls = self.library.snapshot()
        with self.model_lock:
            (wins,) = embed_windows(self.model, [feat], **idx.window_settings, device=self.device,
                                    batch_size=self.hp.eval_batch_size, progress=False)
            t = feature_timeline(feat, self.model, self.hp, idx, device=self.device,
                                 **nulls) if with_timeline else None
        hits = idx.search([wins], k=top_k, by="work")[0]
        matches = [{k: h.get(k) for k in _MATCH_KEYS} | {"verdict": verdict(h["p_value"])}
                   for h in hits]
        tl = None
        if t is not None:
            tl = {"segments": [{k: s[k] for k in ("start_s", "end_s", "work", "p_value", "perf")}
                               for s in t.segments],
                  "works": [{k: w[k] for k in ("work", "seconds", "share", "p_value")}
                            for w in t.works()]}
        best = next((r for r in idx.records if hits and r["perf"] == hits[0]["perf"]), None)
        return {"query": name, "duration_s": round(duration, 3), "matches": matches,
                "timeline": tl, "cqt_png": self._cqt_png(feat, best)}

    def _cqt_png(self, feat: np.ndarray, best: dict | None) -> str | None:
        """Base64 PNG: the query's CQT beside its best match's (None if that cannot be read)."""
        try:
            ref = load_npy(best["feat"]) if best and best.get("feat") else None
        except (OSError, ChlibError):
            ref = None
        if ref is None:
            return None
        fig = Figure(figsize=(9, 3), dpi=80)
        FigureCanvasAgg(fig)
        for k, (x, title) in enumerate(((feat, "query"),
                                         (ref, f"best match: {best['work']}\n({best['perf']})"))):
            ax = fig.add_subplot(1, 2, k + 1)
            x = x[::max(1, len(x) // _PNG_FRAMES)]
            ax.imshow(x.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(0, len(x), 0, x.shape[1]))
            ax.set_title("\n".join(line if len(line) <= 45 else line[:44] + "…"
                                    for line in title.splitlines()), fontsize=9)
            ax.set_xticks([])
            ax.set_ylabel("CQT bin" if k == 0 else "")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def check_token(self, request: Request) -> None:
        """403 when editing is disabled, 401 unless ``Authorization: Bearer <token>`` fits."""
        if self.token is None:
            raise ServeError(403, f"editing is disabled: this server has no token; set "
                                  f"CHLIB_SERVE_TOKEN or write one to {self.dir / 'token'}, "
                                  "then restart it")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token.encode()):
            raise ServeError(401, "missing or wrong token: send the header 'Authorization: "
                                  "Bearer <token>' with this server's token")


def create_app(run_dir: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None,
               checkpoint: str | int = "best", device: str = "auto", token: str | None = None,
               limits: Limits | None = None, decode_workers: int = 2) -> FastAPI:
    """The service's FastAPI app for a trained run (loaded now: a bad run fails here);
    ``app.state.service`` is its :class:`Service`. The decoder processes stop at shutdown."""
    svc = Service(run_dir, dataset_dir=dataset_dir, checkpoint=checkpoint, device=device,
                  token=token, limits=limits, decode_workers=decode_workers)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        svc.pool.close()

    app = FastAPI(title="chlib identification service", lifespan=lifespan,
                  description=f"Identify recordings against run {svc.run_dir.name}.")
    app.state.service = svc
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    _add_error_handlers(app)
    app.include_router(_query_routes(svc))
    app.include_router(_library_routes(svc))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"detail": "<a plain sentence>"}`` with its status code."""

    @app.exception_handler(ServeError)
    async def _refused(_: Request, e: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        what = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return JSONResponse({"detail": f"malformed request ({what}); see /docs for the "
                                       "parameters"}, status_code=422)

    @app.exception_handler(ChlibError)
    async def _unusable(_: Request, e: ChlibError) -> JSONResponse:
        return JSONResponse({"detail": f"the request cannot be served: {e}"}, status_code=422)


async def _upload(svc: Service, request: Request) -> Any:
    return await receive_upload(request.headers, request.stream(), svc.tmp_dir, svc.limits)


def _query_routes(svc: Service) -> APIRouter:
    """The page, /health, /identify, /works, /works/{work} and /audio/{perf}."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        if not (STATIC_DIR / "index.html").is_file():
            raise ServeError(404, "the web page is not installed (chlib/serve/static/index.html);"
                                  " use the API, see /docs")
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/health")
    def health() -> dict:
        return svc.health()

    @router.post("/identify", openapi_extra=_FORM)
    async def identify(request: Request, top_k: int = Query(10, ge=1, le=1000),
                       timeline: bool = True) -> JSONResponse:
        up = await _upload(svc, request)
        try:
            out = await run_in_threadpool(svc.identify, up.path, up.filename, top_k=top_k,
                                          with_timeline=timeline)
        finally:
            up.delete()
        return JSONResponse(json_safe(out))

    @router.get("/works")
    def works() -> JSONResponse:
        return JSONResponse(json_safe(svc.library.works()))

    @router.get("/works/{work:path}")
    def work(work: str) -> JSONResponse:
        recs = [r for r in svc.library.index.records if r["work"] == work]
        if not recs:
            raise ServeError(404, f"work {work!r} is not in the index; GET /works lists them")
        rows = [{"perf": r["perf"], "has_audio": svc.library.audio_path(r) is not None}
                for r in recs]
        return JSONResponse(json_safe({"work": work, "work_id": recs[0].get("work_id"),
                                       "recordings": rows}))

    @router.get("/audio/{perf:path}")
    def audio(perf: str) -> FileResponse:
        path = svc.library.audio_path(svc.library.record(perf))
        if path is not None:
            with open(path, "rb") as f:
                kind = sniff_audio(f.read(12))
            if kind is not None:
                return FileResponse(path, media_type=AUDIO_TYPES[kind][0])
        raise ServeError(404, f"no audio for perf {perf!r}: it is not in the index or its "
                              "audio file is missing")

    return router


def _new_perf(filename: str, sha: str) -> str:
    """An id for an added recording: its file name's stem (safe characters) + 8 hex of it."""
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in
                   Path(filename).stem).strip("._-")[:60] or "upload"
    return f"{stem}-{sha[:8]}"


def _library_routes(svc: Service) -> APIRouter:
    """POST /references and DELETE /references/{perf}, behind the token."""
    router = APIRouter(dependencies=[Depends(svc.check_token)])

    @router.post("/references", openapi_extra=_REF_FORM)
    async def add_reference(request: Request) -> JSONResponse:
        up = await _upload(svc, request)
        try:
            work = clean_work(up.fields.get("work"))
            perf = up.fields.get("perf", "").strip() or _new_perf(
                up.filename, await run_in_threadpool(file_sha256, up.path))
            check_perf(perf)
            if svc.library.record(perf) is not None:
                raise ServeError(409, f"perf {perf!r} is already in the index; choose another "
                                      f"id or DELETE /references/{perf} first")
            feat, dur = await run_in_threadpool(svc.pool.decode, up.path, svc.hp.features,
                                                svc.limits)
            n = await run_in_threadpool(svc.library.add, feat, up.path, up.kind, work=work,
                                        perf=perf, duration_s=dur)
        finally:
            up.delete()
        return JSONResponse({"perf": perf, "work": work, "n_references": n})

    @router.delete("/references/{perf:path}")
    def remove_reference(perf: str) -> dict:
        return {"removed": perf, "n_references": svc.library.remove(perf)}

    return router


def serve(run_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
          **create_app_kw: Any) -> None:
    """Run the service with uvicorn until interrupted (``create_app_kw``: :func:`create_app`'s
    keywords). Only this machine can reach it unless ``host`` says otherwise."""
    uvicorn.run(create_app(run_dir, **create_app_kw), host=host, port=port, log_level="info")
