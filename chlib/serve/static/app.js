// chlib identification page: choose, drop or record a recording, POST /identify, show the
// matches, the timeline and the CQT picture. Plain JS, no build step, nothing from outside.
// Every string from the server goes in through textContent (never innerHTML).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const UNKNOWN = "unknown"; // the timeline's label for time matched to no work
  const UNKNOWN_COLOUR = "#d4d4d4";
  // one colour per work (tab10, then Dark2), the same order as chlib's notebook pictures
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e",
    "#e6ab02", "#a6761d", "#666666"];
  const VERDICT_CLASS = {
    "likely the same work": "v-likely",
    "possibly related": "v-possible",
    "no confident match": "v-none",
  };

  const state = { file: null, health: null, queryUrl: null, recorder: null, chunks: [],
    busy: false, duration: 0 };

  // ---- small helpers -------------------------------------------------------------------
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function clock(seconds) {
    const s = Number.isFinite(seconds) ? Math.round(seconds) : 0;
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  // a limit in words: "15 min", "90 s", "1 h 30 min"
  function duration(seconds) {
    if (seconds < 120) return Math.round(seconds) + " s";
    const m = Math.round(seconds / 60);
    return m < 60 ? m + " min" : Math.floor(m / 60) + " h" + (m % 60 ? " " + (m % 60) + " min" : "");
  }

  function fmtP(p) {
    if (p === null || p === undefined || !Number.isFinite(Number(p))) return "\u2013";
    p = Number(p);
    if (p < 0.0001) return "< 0.0001";
    if (p < 0.01) return p.toFixed(4);
    return p.toFixed(3);
  }

  function fmtSig(x) {
    x = Number(x);
    if (!Number.isFinite(x)) return "\u2013";
    return Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(2);
  }

  function fmtMB(bytes) {
    if (bytes < 1e5) return Math.max(1, Math.round(bytes / 1e3)) + " kB";
    return (bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0) + " MB";
  }

  function showError(message) {
    const e = $("error");
    e.textContent = message;
    e.hidden = !message;
  }

  // FastAPI's {"detail": "..."}; its validation errors carry a list of {"msg"}.
  async function errorText(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    const d = body && body.detail;
    if (typeof d === "string" && d) return d;
    if (Array.isArray(d) && d.length) {
      return d.map((x) => (x && x.msg) ? String(x.msg) : JSON.stringify(x)).join("; ");
    }
    return "The service answered " + resp.status + " " + (resp.statusText || "") +
      " without saying why; try again, or ask whoever runs it to look at its log.";
  }

  // ---- the service's state -------------------------------------------------------------
  async function loadHealth() {
    const h = $("health");
    try {
      const resp = await fetch("/health", { cache: "no-store" });
      if (!resp.ok) throw new Error(await errorText(resp));
      const s = await resp.json();
      state.health = s;
      const works = Number(s.n_works), refs = Number(s.n_references);
      h.textContent = "Ready: model " + s.run + (s.epoch !== undefined ? " (epoch " + s.epoch + ")" : "") +
        " \u00b7 " + works + (works === 1 ? " work" : " works") + " \u00b7 " + refs +
        (refs === 1 ? " reference recording" : " reference recordings");
      h.className = "health ok";
      const lim = [];
      if (Number.isFinite(Number(s.max_upload_mb))) lim.push("up to " + Number(s.max_upload_mb) + " MB");
      if (Number.isFinite(Number(s.max_duration_s))) lim.push(duration(Number(s.max_duration_s)) + " long");
      if (lim.length) $("limits").textContent = "WAV, FLAC, MP3, OGG, M4A and other audio files, " + lim.join(" and ") + ".";
    } catch (err) {
      h.textContent = "The service is not answering (" + (err && err.message ? err.message : err) +
        "). Reload the page once it is running.";
      h.className = "health bad";
    }
  }

  // ---- choosing a recording ------------------------------------------------------------
  function setFile(file) {
    state.file = file;
    showError("");
    const chosen = $("chosen");
    const audio = $("query-audio");
    if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
    state.queryUrl = null;
    if (!file) {
      chosen.hidden = true;
      audio.hidden = true;
      audio.removeAttribute("src");
      $("identify").disabled = true;
      return;
    }
    chosen.textContent = "Chosen: " + file.name + " (" + fmtMB(file.size) + ")";
    chosen.hidden = false;
    state.queryUrl = URL.createObjectURL(file);
    audio.src = state.queryUrl;
    audio.hidden = false;
    $("identify").disabled = state.busy;
    if (tooBig(file)) {
      const max = Number(state.health.max_upload_mb);
      showError(file.name + " is " + fmtMB(file.size) + ", more than this service takes (" + max +
        " MB). Cut out the part you want identified, or save it compressed (MP3, OGG), and try again.");
    }
  }

  function tooBig(file) {
    const max = state.health && Number(state.health.max_upload_mb);
    return Boolean(max) && file.size > max * 1e6;
  }

  function setupDrop() {
    const drop = $("drop");
    const input = $("file");
    input.addEventListener("change", () => setFile(input.files && input.files[0] ? input.files[0] : null));
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => {
      ev.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
      if (f) setFile(f);
    });
    // a file dropped beside the box must not make the browser navigate away to it
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
  }

  // ---- recording from the microphone ---------------------------------------------------
  function recordingType() {
    const types = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/ogg",
      "audio/mp4"];
    for (const t of types) {
      if (window.MediaRecorder && MediaRecorder.isTypeSupported && MediaRecorder.isTypeSupported(t)) return t;
    }
    return "";
  }

  // A recording (WebM/Ogg/MP4, whatever the browser makes) as a 16 kHz mono 16-bit WAV, which
  // every server decodes: browsers record in containers a service may not take.
  async function toWav(blob) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    const ctx = new Ctx();
    let decoded;
    try {
      decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
    } finally {
      if (ctx.close) ctx.close();
    }
    const rate = 16000;
    const off = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * rate)), rate);
    const src = off.createBufferSource();
    src.buffer = decoded; // channels are mixed down to the one output channel
    src.connect(off.destination);
    src.start();
    const y = (await off.startRendering()).getChannelData(0);
    const out = new DataView(new ArrayBuffer(44 + 2 * y.length));
    const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
    text(0, "RIFF"); out.setUint32(4, 36 + 2 * y.length, true); text(8, "WAVE");
    text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
    out.setUint32(24, rate, true); out.setUint32(28, 2 * rate, true); out.setUint16(32, 2, true);
    out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, 2 * y.length, true);
    for (let i = 0; i < y.length; i++) {
      const v = Math.max(-1, Math.min(1, y[i]));
      out.setInt16(44 + 2 * i, v < 0 ? v * 0x8000 : v * 0x7fff, true);
    }
    return new Blob([out.buffer], { type: "audio/wav" });
  }

  function setupRecorder() {
    const btn = $("record");
    const note = $("rec-note");
    if (!window.MediaRecorder || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      btn.disabled = true;
      note.textContent = window.isSecureContext === false
        ? "Recording needs the page opened over https:// (or on this computer); choose a file instead."
        : "This browser cannot record here; choose a file instead.";
      return;
    }
    let started = 0, ticker = null;
    btn.addEventListener("click", async () => {
      if (state.recorder && state.recorder.state === "recording") {
        state.recorder.stop();
        return;
      }
      showError("");
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      } catch (err) {
        showError("The microphone could not be opened (" + (err && err.name ? err.name : err) +
          "). Allow this page to use the microphone in the browser's settings, or choose a file.");
        return;
      }
      const type = recordingType();
      const rec = type ? new MediaRecorder(stream, { mimeType: type }) : new MediaRecorder(stream);
      state.recorder = rec;
      state.chunks = [];
      rec.addEventListener("dataavailable", (ev) => { if (ev.data && ev.data.size) state.chunks.push(ev.data); });
      rec.addEventListener("stop", () => {
        clearInterval(ticker);
        stream.getTracks().forEach((t) => t.stop());
        btn.textContent = "\u25cf Record from the microphone";
        btn.classList.remove("recording");
        note.textContent = "";
        const mime = (rec.mimeType || type || "audio/webm").split(";")[0];
        const blob = new Blob(state.chunks, { type: mime });
        if (!blob.size) {
          showError("Nothing was recorded; check that the microphone is connected and try again.");
          return;
        }
        const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
        note.textContent = "Preparing the recording\u2026";
        toWav(blob).then((wav) => {
          note.textContent = "";
          setFile(new File([wav], "recording-" + stamp + ".wav", { type: "audio/wav" }));
        }, () => { // this browser cannot decode its own recording: send it as it is
          note.textContent = "";
          const ext = mime.indexOf("ogg") >= 0 ? "ogg" : mime.indexOf("mp4") >= 0 ? "m4a" : "webm";
          setFile(new File([blob], "recording-" + stamp + "." + ext, { type: mime }));
        });
      });
      rec.start(1000);
      started = Date.now();
      btn.textContent = "\u25a0 Stop recording";
      btn.classList.add("recording");
      note.textContent = "Recording 0:00";
      ticker = setInterval(() => { note.textContent = "Recording " + clock((Date.now() - started) / 1000); }, 500);
    });
  }

  // ---- identifying ---------------------------------------------------------------------
  function setBusy(busy) {
    state.busy = busy;
    const b = $("identify");
    b.disabled = busy || !state.file;
    b.textContent = busy ? "Identifying..." : "Identify";
    $("record").disabled = busy || $("record").dataset.unavailable === "1";
    $("file").disabled = busy;
    $("busy-note").textContent = busy ? "Listening to the recording and comparing it with the collection; long recordings take a while." : "";
    $("results").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function identify(ev) {
    ev.preventDefault();
    if (!state.file || state.busy) return;
    if (tooBig(state.file)) { setFile(state.file); return; } // says why, uploads nothing
    showError("");
    setBusy(true);
    try {
      const body = new FormData();
      body.append("file", state.file, state.file.name);
      let resp;
      try {
        resp = await fetch("/identify?top_k=10&timeline=true", { method: "POST", body: body });
      } catch (err) {
        throw new Error("The service could not be reached (" + (err && err.message ? err.message : err) +
          "); check that it is still running and try again.");
      }
      if (!resp.ok) throw new Error(await errorText(resp));
      render(await resp.json());
    } catch (err) {
      $("results").hidden = true;
      showError(err && err.message ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  }

  // ---- showing the answer --------------------------------------------------------------
  function workColours(result) {
    const order = [];
    const add = (w) => { if (w !== undefined && w !== null && w !== UNKNOWN && order.indexOf(String(w)) < 0) order.push(String(w)); };
    const tl = result.timeline;
    if (tl && Array.isArray(tl.works)) tl.works.forEach((w) => add(w.work));
    if (tl && Array.isArray(tl.segments)) tl.segments.forEach((s) => add(s.work));
    const colours = new Map();
    order.forEach((w, i) => colours.set(w, PALETTE[i % PALETTE.length]));
    return colours;
  }

  function colourOf(colours, work) {
    return (work === null || work === undefined || work === UNKNOWN) ? UNKNOWN_COLOUR
      : (colours.get(String(work)) || UNKNOWN_COLOUR);
  }

  // each row's button says Pause while its recording plays, else Play
  function syncPlayButtons() {
    const audio = $("match-audio");
    document.querySelectorAll("#matches button.play").forEach((b) => {
      const on = audio.dataset.perf === b.dataset.perf && !audio.paused;
      b.textContent = on ? "\u275a\u275a Pause" : "\u25b6 Play";
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  function playMatch(m) {
    const audio = $("match-audio");
    const perf = String(m.perf);
    if (audio.dataset.perf === perf && !audio.paused) { audio.pause(); return; }
    if (audio.dataset.perf !== perf) {
      audio.dataset.perf = perf;
      audio.src = "/audio/" + encodeURIComponent(perf);
    }
    $("query-audio").pause();
    $("match-player").hidden = false;
    $("now-playing").textContent = "Match " + m.rank + ": " + m.work + " (recording " + perf + ")";
    audio.play().catch(() => { /* the error event says why */ });
  }

  function renderMatches(result) {
    const tbody = document.querySelector("#matches tbody");
    tbody.replaceChildren();
    const matches = Array.isArray(result.matches) ? result.matches : [];
    for (const m of matches) {
      const tr = el("tr", { class: VERDICT_CLASS[m.verdict] || "v-none" });
      tr.append(el("td", { class: "num", "data-label": "#" }, m.rank));
      tr.append(el("td", { class: "work", "data-label": "Work" }, m.work));
      const v = el("td", { class: "verdict", "data-label": "Verdict" });
      v.append(el("span", { class: "badge" }, m.verdict));
      tr.append(v);
      tr.append(el("td", { class: "num", "data-label": "p-value" }, fmtP(m.p_value)));
      tr.append(el("td", { class: "num wide-only", "data-label": "Distance" }, fmtSig(m.distance)));
      const td = el("td", { class: "listen" });
      if (m.perf !== null && m.perf !== undefined && m.perf !== "") {
        const b = el("button", { type: "button", class: "play secondary", "aria-pressed": "false",
          "data-perf": String(m.perf), title: "Play " + m.work + " (recording " + m.perf + ")" },
          "\u25b6 Play");
        b.addEventListener("click", () => playMatch(m));
        td.append(b);
      }
      tr.append(td);
      tbody.append(tr);
    }
    const headline = $("headline");
    headline.replaceChildren();
    const best = matches[0];
    if (!best) {
      headline.textContent = "The collection holds no works to compare with yet.";
    } else if (best.verdict === "likely the same work" || best.verdict === "possibly related") {
      headline.append(document.createTextNode(result.query + " is " +
        (best.verdict === "likely the same work" ? "likely the same work as " : "possibly related to ")));
      headline.append(el("strong", {}, best.work));
      headline.append(document.createTextNode("."));
    } else {
      const n = state.health ? Number(state.health.n_works) : NaN;
      headline.textContent = "No confident match for " + result.query +
        (Number.isFinite(n) ? " among the " + n + " works in the collection" : "") +
        ". The nearest works are listed below, but none is close enough to trust.";
    }
  }

  function renderTimeline(result, colours) {
    const block = $("timeline-block");
    const bar = $("timeline");
    const axis = $("axis");
    const legend = $("legend");
    bar.replaceChildren();
    axis.replaceChildren();
    legend.replaceChildren();
    const tl = result.timeline;
    const segs = tl && Array.isArray(tl.segments) ? tl.segments : [];
    const lastEnd = segs.reduce((a, s) => Math.max(a, Number(s.end_s) || 0), 0);
    const dur = Number(result.duration_s) > 0 ? Number(result.duration_s) : lastEnd;
    if (!segs.length || !(dur > 0)) { block.hidden = true; return; }
    block.hidden = false;
    segs.forEach((s, i) => {
      const start = Math.max(0, Number(s.start_s) || 0);
      const end = Math.min(dur, Math.max(start, Number(s.end_s) || 0));
      const unknown = s.work === null || s.work === undefined || s.work === UNKNOWN;
      const label = clock(start) + "\u2013" + clock(end) + ": " +
        (unknown ? "no work" : s.work + (Number.isFinite(Number(s.p_value)) && s.p_value !== null ? " (p " + fmtP(s.p_value) + ")" : ""));
      const b = el("button", { type: "button", class: "seg" + (unknown ? " unknown" : ""),
        title: label + "; click to play from " + clock(start), "aria-label": label + ", play from here",
        "data-index": String(i) });
      b.style.left = (100 * start / dur) + "%";
      b.style.width = (100 * (end - start) / dur) + "%";
      b.style.backgroundColor = colourOf(colours, s.work);
      if (!unknown && (end - start) / dur > 0.12) b.append(el("span", { class: "seg-text" }, s.work));
      b.addEventListener("click", () => {
        const q = $("query-audio");
        $("match-audio").pause();
        q.currentTime = start;
        q.play().catch(() => { /* nothing to play, or the browser said no */ });
      });
      bar.append(b);
    });
    bar.append(el("div", { class: "playhead", id: "playhead" }));
    state.duration = dur; // its ticks: renderAxis, once the bar is on screen and has a width
    const works = tl && Array.isArray(tl.works) ? tl.works : [];
    for (const w of works) {
      const li = el("li");
      const sw = el("span", { class: "swatch" });
      sw.style.backgroundColor = colourOf(colours, w.work);
      li.append(sw);
      const unknown = w.work === UNKNOWN || w.work === null;
      li.append(el("span", { class: "legend-work" }, unknown ? "no work" : w.work));
      const share = Number(w.share);
      li.append(el("span", { class: "legend-time" }, " " + clock(Number(w.seconds)) +
        (Number.isFinite(share) ? " (" + Math.round(100 * share) + " %)" : "")));
      legend.append(li);
    }
    if (!works.some((w) => w.work === UNKNOWN) && segs.some((s) => s.work === UNKNOWN || s.work === null)) {
      const li = el("li");
      const sw = el("span", { class: "swatch" });
      sw.style.backgroundColor = UNKNOWN_COLOUR;
      li.append(sw, el("span", { class: "legend-work" }, "no work"));
      legend.append(li);
    }
  }

  // "m:ss" ticks under the timeline, at most one per 64 px of its width
  function renderAxis() {
    const axis = $("axis");
    const dur = state.duration;
    axis.replaceChildren();
    if (!(dur > 0)) return;
    const width = $("timeline").clientWidth || 640;
    const most = Math.max(2, Math.floor(width / 64));
    const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200]
      .find((t) => dur / t <= most - 1) || 7200;
    const tick = (t, cls) => {
      const e = el("span", { class: "tick" + (cls ? " " + cls : "") }, clock(t));
      e.style.left = (100 * t / dur) + "%";
      axis.append(e);
    };
    // every step, leaving 56 px before the end's label
    for (let t = 0; (dur - t) / dur * width >= 56; t += step) tick(t, t === 0 ? "start" : "");
    tick(dur, "end");
  }

  function renderCqt(result) {
    const block = $("cqt-block");
    const img = $("cqt");
    if (typeof result.cqt_png === "string" && result.cqt_png) {
      img.src = "data:image/png;base64," + result.cqt_png.replace(/[^A-Za-z0-9+/=]/g, "");
      const best = result.matches && result.matches[0];
      img.alt = "Constant-Q spectrum of " + result.query + (best ? " beside that of " + best.work : "");
      block.hidden = false;
    } else {
      img.removeAttribute("src");
      block.hidden = true;
    }
  }

  function render(result) {
    const colours = workColours(result);
    const m = $("match-audio");
    m.pause();
    delete m.dataset.perf;
    m.removeAttribute("src");
    $("match-player").hidden = true;
    renderMatches(result);
    renderTimeline(result, colours);
    renderCqt(result);
    $("results").hidden = false;
    renderAxis();
    $("results").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  function setupPlayers() {
    const q = $("query-audio");
    q.addEventListener("timeupdate", () => {
      const ph = $("playhead");
      if (!ph || !(q.duration > 0)) return;
      ph.style.left = (100 * q.currentTime / q.duration) + "%";
      ph.style.display = "block";
    });
    const m = $("match-audio");
    ["play", "playing", "pause", "ended", "emptied"].forEach((t) => m.addEventListener(t, syncPlayButtons));
    m.addEventListener("error", async () => {
      syncPlayButtons();
      const src = m.getAttribute("src");
      if (!src) return;
      let message = "This browser cannot play the recording of this match (its format is not one it knows).";
      try { // a 404 carries the service's reason; a small JSON answer, so fetching it is cheap
        const resp = await fetch(src, { method: "GET", cache: "no-store" });
        if (!resp.ok) message = await errorText(resp);
        else if (resp.body && resp.body.cancel) resp.body.cancel();
      } catch (_) {
        message = "The recording of this match could not be fetched; check that the service is still running.";
      }
      if (m.getAttribute("src") !== src) return; // another match was chosen meanwhile
      const e = $("player-error");
      e.textContent = message;
      e.hidden = false;
    });
    m.addEventListener("loadstart", () => { $("player-error").hidden = true; });
    q.addEventListener("play", () => m.pause());
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupDrop();
    setupRecorder();
    if ($("record").disabled) $("record").dataset.unavailable = "1";
    setupPlayers();
    $("form").addEventListener("submit", identify);
    let resizing = null;
    window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(renderAxis, 100); });
    loadHealth();
  });
})();
