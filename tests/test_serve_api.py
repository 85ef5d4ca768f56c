"""chlib.serve: the identification service's HTTP API (issue 13), with FastAPI's TestClient
against one tiny trained run (trained once for the module)."""

import io
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from helpers import make_tiny_dataset, tiny_config, tone

import chlib.retrieval.index as index_mod
from chlib.core.config import HParams, save_hparams
from chlib.core.errors import ConfigError
from chlib.retrieval.identify import identify, reference_records
from chlib.retrieval.index import ReferenceIndex, build_index
from chlib.serve.app import create_app
from chlib.serve.library import load_token
from chlib.serve.limits import Limits, sniff_audio
from chlib.train.loop import train

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wav_bytes(seconds=6.0, freqs=(220.0, 330.0), seed=0, silent=False) -> bytes:
    buf = io.BytesIO()
    y = tone(seconds, freqs=freqs, seed=seed)
    sf.write(buf, 0 * y if silent else y, 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()  # restored below: later modules keep their threads
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    ds = make_tiny_dataset(root)
    (ds / "audio").mkdir()
    sf.write(ds / "audio" / "w0_r0.wav", tone(3.0), 16000)  # one reference with audio
    run_dir = root / "runs" / "tiny"
    save_hparams(HParams.from_dict(tiny_config(ds, max_epochs=1)),
                 run_dir / "config" / "hparams.yaml")
    train(run_dir, device="cpu", max_epochs=1, progress=False)
    yield run_dir, ds
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(run):
    app = create_app(run[0], device="cpu", token=TOKEN, decode_workers=2)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def svc(client):
    return client.app.state.service


def post(client, url="/identify", audio=b"", name="q.wav", **kw):
    return client.post(url, files={"file": (name, audio, "application/octet-stream")}, **kw)


def test_health_names_the_run_its_size_and_limits(client):
    h = client.get("/health").json()
    assert h == {"status": "ok", "run": "tiny", "epoch": h["epoch"], "n_works": 6,
                 "n_references": 18, "max_upload_mb": 200.0, "max_duration_s": 7200.0,
                 "can_edit": True}
    assert isinstance(h["epoch"], int)


def test_identify_answers_as_chlib_identify_does(client, svc, tmp_path):
    data = wav_bytes()
    r = post(client, audio=data, name="my tune.wav", params={"top_k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["query"] == "my tune.wav" and out["duration_s"] == pytest.approx(6.0, abs=0.1)
    assert [m["rank"] for m in out["matches"]] == [1, 2, 3]
    assert set(out["matches"][0]) == {"rank", "work", "work_id", "perf", "distance", "p_value",
                                      "verdict"}
    (tmp_path / "q.wav").write_bytes(data)  # the same file through chlib's own identify
    rows = identify([tmp_path / "q.wav"], model=svc.model, hp=svc.hp, index=svc.library.index,
                    device="cpu", top_k=3).rows
    assert [m["work"] for m in out["matches"]] == [r["work"] for r in rows]
    assert [m["verdict"] for m in out["matches"]] == [r["verdict"] for r in rows]
    np.testing.assert_allclose([m["distance"] for m in out["matches"]],
                               [r["distance"] for r in rows], atol=1e-5)
    segs = out["timeline"]["segments"]
    assert segs[0]["start_s"] == 0 and segs[-1]["end_s"] == pytest.approx(6.0, abs=0.1)
    assert all(set(w) == {"work", "seconds", "share", "p_value"} for w in out["timeline"]["works"])
    assert out["cqt_png"] and __import__("base64").b64decode(out["cqt_png"])[:4] == b"\x89PNG"
    assert not list(svc.tmp_dir.iterdir())  # the upload was deleted
    assert post(client, audio=data, params={"timeline": "false"}).json()["timeline"] is None


@pytest.mark.parametrize("name,data,status", [
    ("empty.wav", b"", 400),
    ("notes.mp3", b"these are my notes, not audio\n" * 10, 415),
    ("corrupt.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40, 422),
    ("silence.wav", wav_bytes(3.0, silent=True), 422),
    ("short.wav", wav_bytes(0.3), 422),
])
def test_identify_refuses_bad_files_with_a_plain_reason(client, name, data, status):
    r = post(client, audio=data, name=name)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) > 20


def test_malformed_requests_are_422(client):
    assert client.post("/identify", content=b"raw", headers={"content-type": "audio/wav"}
                       ).status_code == 422
    assert client.post("/identify", data={"other": "x"}, files={"x": ("a", b"1")}
                       ).status_code == 422  # no 'file' field
    r = post(client, audio=wav_bytes(), params={"top_k": "ten"})  # FastAPI's own validation
    assert r.status_code == 422 and "top_k" in r.json()["detail"]  # a sentence, as the others


def test_limits_give_413_and_504(client, svc, monkeypatch):
    monkeypatch.setattr(svc, "limits", Limits(max_upload_mb=0.01))  # 10 kB
    assert post(client, audio=wav_bytes(2.0)).status_code == 413
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
            + wav_bytes(2.0) + b"\r\n--B--\r\n")
    r = client.post("/identify", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                    headers={"content-type": "multipart/form-data; boundary=B"})  # chunked:
    assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]  # stopped as it streamed
    assert not list(svc.tmp_dir.iterdir())
    monkeypatch.setattr(svc, "limits", Limits(max_duration_s=3.0))
    r = post(client, audio=wav_bytes(6.0))
    assert r.status_code == 413 and "3 s" in r.json()["detail"]
    monkeypatch.setattr(svc, "limits", Limits(decode_timeout_s=0.001))  # a warm worker decodes
    assert post(client, audio=wav_bytes(300.0, freqs=(330.0,))).status_code == 504  # 6 s in 4 ms
    monkeypatch.setattr(svc, "limits", Limits())
    assert post(client, audio=wav_bytes(6.0)).status_code == 200  # the worker was replaced
    with pytest.raises(ConfigError, match="max_upload_mb"):
        Limits(max_upload_mb=0)


def test_sniffing_reads_the_content_not_the_name():
    assert sniff_audio(b"RIFF\0\0\0\0WAVEfmt ") == "wav"
    assert sniff_audio(b"fLaC\0\0\0\x22") == "flac" and sniff_audio(b"OggS\0\x02") == "ogg"
    assert sniff_audio(b"ID3\x04\0") == "mp3" and sniff_audio(b"\xff\xfb\x90\x64") == "mp3"
    assert sniff_audio(b"\xff\xf1\x50\x80") is None  # AAC ADTS, not MP3
    assert sniff_audio(b"FORM\0\0\0\0AIFF") == "aiff"
    assert sniff_audio(b"\0\0\0\x20ftypM4A ") == "m4a" and sniff_audio(b"hello") is None


def test_works_work_and_audio(client):
    works = client.get("/works").json()
    assert [w["work"] for w in works] == sorted(f"work{i}" for i in range(6))
    assert works[0] == {"work": "work0", "work_id": 0, "n_recordings": 3}
    w0 = client.get("/works/work0").json()
    assert w0["work"] == "work0" and {"perf": "w0_r0", "has_audio": True} in w0["recordings"]
    assert {"perf": "w0_r1", "has_audio": False} in w0["recordings"]
    assert client.get("/works/nope").status_code == 404
    a = client.get("/audio/w0_r0")
    assert a.status_code == 200 and a.headers["content-type"] == "audio/wav"
    assert a.content[:4] == b"RIFF"
    assert client.get("/audio/w0_r1").status_code == 404  # in the index, no audio file
    assert client.get("/audio/w0_r3").status_code == 404  # a test recording: not a reference
    assert client.get("/audio/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_editing_needs_the_token(client, svc, monkeypatch, tmp_path):
    data = wav_bytes(freqs=(440.0,))
    assert post(client, "/references", data, data={"work": "x"}).status_code == 401
    r = post(client, "/references", data, data={"work": "x"},
             headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.delete("/references/w0_r0", headers={"Authorization": TOKEN}).status_code == 401
    monkeypatch.setattr(svc, "token", None)
    r = client.delete("/references/w0_r0", headers=AUTH)
    assert r.status_code == 403 and "CHLIB_SERVE_TOKEN" in r.json()["detail"]
    assert client.get("/health").json()["can_edit"] is False
    monkeypatch.delenv("CHLIB_SERVE_TOKEN", raising=False)  # where the token comes from
    assert load_token(tmp_path) is None
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(tmp_path) == "from-file"
    monkeypatch.setenv("CHLIB_SERVE_TOKEN", "from-env")
    assert load_token(tmp_path) == "from-env" and load_token(tmp_path, "given") == "given"


def _assert_equals_fresh_build(svc, records):
    fresh = build_index(svc.model, records, svc.hp, device="cpu", progress=False)
    idx = svc.library.index
    assert idx.perfs == fresh.perfs and idx.works == fresh.works
    np.testing.assert_allclose(idx.embeddings, fresh.embeddings, atol=1e-5)
    np.testing.assert_allclose(idx.windows, fresh.windows, atol=1e-5)


def test_add_then_remove_equals_a_fresh_build(client, svc, run):
    refs = reference_records(run[1])
    r = post(client, "/references", wav_bytes(freqs=(440.0, 660.0)), name="new.wav",
             data={"work": " work1 ", "perf": "new_take"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"perf": "new_take", "work": "work1", "n_references": 19}
    added = svc.library.record("new_take")
    assert added["work_id"] == 1 and client.get("/audio/new_take").status_code == 200
    _assert_equals_fresh_build(svc, refs + [added])
    assert post(client, "/references", wav_bytes(), data={"work": "work1", "perf": "new_take"},
                headers=AUTH).status_code == 409
    assert post(client, "/references", wav_bytes(), data={"work": "w", "perf": "../x"},
                headers=AUTH).status_code == 422
    assert post(client, "/references", wav_bytes(), data={"perf": "p"}, headers=AUTH
                ).status_code == 422  # no work
    r = client.delete("/references/w2_r0", headers=AUTH)
    assert r.json() == {"removed": "w2_r0", "n_references": 18}
    _assert_equals_fresh_build(svc, [x for x in refs if x["perf"] != "w2_r0"] + [added])
    assert client.delete("/references/w2_r0", headers=AUTH).status_code == 404
    assert client.delete("/references/new_take", headers=AUTH).status_code == 200
    assert not (svc.library.library_dir / "new_take.wav").exists()
    r = post(client, "/references", wav_bytes(seed=3), name="session one.wav",
             data={"work": "a brand new work"}, headers=AUTH)  # perf made from name + content
    assert r.status_code == 200 and r.json()["perf"].startswith("session_one-")
    assert client.get("/works/a brand new work").json()["work_id"] == 6
    assert client.delete(f"/references/{r.json()['perf']}", headers=AUTH).status_code == 200


def test_a_crash_mid_save_keeps_the_previous_index(client, svc, run, monkeypatch):
    before = svc.library.index.perfs

    def torn(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_mod, "atomic_write_text", torn)  # npy files written, then this
    r = post(client, "/references", wav_bytes(freqs=(523.0,)), data={"work": "work3",
                                                                       "perf": "doomed"},
             headers=AUTH)
    assert r.status_code == 500 and "nothing was changed" in r.json()["detail"]
    assert client.delete("/references/w1_r1", headers=AUTH).status_code == 500
    monkeypatch.undo()
    assert svc.library.index.perfs == before
    assert not list(svc.library.library_dir.glob("doomed*"))
    live = svc.library.dir / svc.library._current_name()
    assert ReferenceIndex.load(live).perfs == before  # what a restart reads
    app = create_app(run[0], device="cpu", token=TOKEN, decode_workers=1)
    try:
        assert app.state.service.library.index.perfs == before
        assert app.state.service.library.status.startswith("loaded")
        assert len(list(svc.library.dir.glob("index-*"))) == 1  # the torn folder was cleared
    finally:
        app.state.service.pool.close()


def test_concurrent_identify_calls_all_succeed(client):
    data = [wav_bytes(seed=s, freqs=(200.0 + 50 * s,)) for s in range(6)]
    codes = []

    def call(b):
        codes.append(post(client, audio=b, params={"top_k": 2}).status_code)

    threads = [threading.Thread(target=call, args=(b,)) for b in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 6


def test_page_static_files_and_openapi(client):
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/identify", "/works", "/works/{work}", "/audio/{perf}", "/references",
            "/references/{perf}", "/health"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
