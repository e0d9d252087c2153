// The orchestrator's dashboard: polls /dashboard/api/state every second and redraws.
// Request content and client headers are arbitrary text: the DOM is built with textContent only,
// never innerHTML, so markup in them shows as text. Polling (not a socket) makes reconnection free:
// a gateway or backend restart is a few failed polls, then the page goes on.
"use strict";

const STATE_URL = "/dashboard/api/state";
let csrf = "";
let failures = 0;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function num(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }
function secs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}
function sum(obj) { return Object.values(obj || {}).reduce((a, b) => a + b, 0); }
function statusClass(s) {
  if (s === "200") return "st-ok";
  if (s === "cancelled" || s === "client_gone") return "st-warn";
  return s ? "st-bad" : "";
}

function tile(key, value, sub, id) {
  const t = el("div", null, "tile");
  t.append(el("div", key, "k"));
  const v = el("div", value, "v");
  if (id) v.id = id;
  t.append(v);
  if (sub) t.append(el("div", sub, "s"));
  return t;
}

function renderTiles(s) {
  const t = s.totals;
  const hit = t.prompt.hit || 0, miss = t.prompt.miss || 0;
  const share = hit + miss ? Math.round(100 * hit / (hit + miss)) + "%" : "–";
  const bgModel = t.background.model || 0;
  const tiles = [
    tile("requests", num(sum(t.requests)), `${num(t.requests["200"] || 0)} ok`, "total-requests"),
    tile("prompt tokens from cache", share, `${num(hit)} cached · ${num(miss)} computed`, "cache-share"),
    tile("output tokens", num(t.output), null, "total-output"),
    tile("KV saves", num(t.kv_saves.saved || 0), `${num(sum(t.kv_saves))} tries`, "kv-saves"),
    tile("KV restores", num(t.kv_restores.restored || 0), `${num(sum(t.kv_restores))} tries`, "kv-restores"),
    tile("background answers", num(bgModel + sum(t.synthetic)),
         `${num(bgModel)} model · ${num(sum(t.synthetic))} synthetic`, "background"),
    tile("clients gone", num(sum(t.disconnects)), null, "disconnects"),
  ];
  document.getElementById("tiles").replaceChildren(...tiles);
}

function cancelButton(id) {
  const b = el("button", "Cancel");
  b.dataset.id = id;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await fetch(`/dashboard/api/cancel/${encodeURIComponent(id)}`,
                  { method: "POST", headers: { "X-Dashboard-CSRF": csrf } });
    } finally { poll(); }
  });
  return b;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.append(c); tr.append(td); }
    else if (Array.isArray(c)) { tr.append(el("td", c[0], c[1])); }
    else tr.append(el("td", c));
  }
  return tr;
}

function fill(tableId, rows, cols, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  if (!rows.length) {
    const tr = el("tr", null, "empty");
    const td = el("td", empty);
    td.colSpan = cols;
    tr.append(td);
    body.replaceChildren(tr);
  } else body.replaceChildren(...rows);
}

function renderBackends(s) {
  const cards = s.backends.map((b) => {
    const c = el("div", null, "card");
    const h = el("h3");
    h.append(el("span", b.name));
    h.append(el("span", b.state, "pill " + (b.state === "ready" ? "ok" : b.state === "unknown" ? "" : "bad")));
    h.append(el("span", b.role, "muted"));
    c.append(h);
    c.append(el("div", `slots ${b.busy}/${b.slots} busy · ${b.queued} queued · restarts ${b.restarts}` +
                       (b.held_after_client_left ? ` · ${b.held_after_client_left} held after client left` : ""),
                "muted"));
    if (b.model_cache) {
      const off = b.kv_saves && !b.kv_saves.on ? b.kv_saves.off_because : "";
      c.append(el("div", `model cache: ${b.model_cache.line || b.model_cache.kind}` +
                         (off && off !== b.model_cache.why ? ` · slot saves off: ${off}` : ""), "muted model-cache"));
    }
    if (b.kv_folder) {  // its save folder: what it holds, and what keeps a save from being made
      const f = b.kv_folder, gb = (v) => (v / 1e9).toFixed(2);
      c.append(el("div", `kv saves: ${num(f.saves)} · ${gb(f.bytes)} of ${gb(f.max_bytes)} GB` +
                         (f.disk_free != null ? ` · ${gb(f.disk_free)} GB free on disk` : ""), "muted kv-folder"));
      for (const why of [f.problem, f.budget]) if (why) c.append(el("div", why, "st-bad kv-folder-problem"));
    }
    if (b.rpc_workers) {
      const workers = Object.entries(b.rpc_workers).map(([w, st]) => `${w} ${(st || "unknown").toLowerCase()}`);
      c.append(el("div", `RPC workers: ${workers.join(" · ")}`, "muted rpc-workers"));
    }
    if (b.served_model) c.append(el("div", `serves ${b.served_model}`, "muted served-model"));
    if (b.last_error) c.append(el("div", b.last_error, "st-bad"));
    const work = s.inflight.filter((r) => r.backend === b.name && (r.state === "prefill" || r.state === "generating"));
    const slots = el("div", null, "slots");
    const n = Math.max(b.slots, (b.llama_slots || []).length);
    for (let i = 0; i < n; i++) {
      const ls = (b.llama_slots || [])[i];
      const r = work[i];
      const busy = (ls && ls.processing) || r;
      const d = el("div", null, "slot" + (busy ? " busy" : ""));
      d.append(el("div", `slot ${i} · ${busy ? "busy" : "idle"}`));
      if (r) {
        d.append(el("div", `#${r.id} ${r.state} ${secs(r.in_state)}`));
        d.append(el("div", `${num(r.computed)} computed · ${num(r.cached)} cached` +
                           (ls && ls.decoded ? ` · ${num(ls.decoded)} decoded` : ""), "muted"));
        if (r.session) d.append(el("div", `session ${r.session}`, "muted"));
      } else if (ls && ls.processing) {
        d.append(el("div", `${num(ls.decoded)} decoded`, "muted"));
      }
      slots.append(d);
    }
    c.append(slots);
    return c;
  });
  document.getElementById("backends").replaceChildren(...cards);
}

function renderTables(s) {
  const queue = s.queue.map((r) => row([r.id, r.priority, [r.session || "–", "text"], [r.agent || "–", "text"],
                                        secs(r.wait), cancelButton(r.id)]));
  if (s.queued > s.queue.length) {  // the gateway lists the first ones only
    const more = el("tr", null, "more"), td = el("td", `… and ${s.queued - s.queue.length} more waiting`);
    td.colSpan = 6;
    more.append(td);
    queue.push(more);
  }
  fill("queue", queue, 6, "nobody waits");
  const running = s.inflight.filter((r) => r.state === "prefill" || r.state === "generating");
  fill("running", running.map((r) => row([r.id, r.backend, r.state, secs(r.in_state), [r.session || "–", "text"],
                                          [r.agent || "–", "text"], num(r.computed), num(r.cached), num(r.output),
                                          r.tps ?? "–", cancelButton(r.id)])), 11, "nothing runs");
  fill("recent", s.recent.map((r) => row([r.id, r.route, r.backend || "gateway", [r.status, statusClass(r.status)],
                                          secs(r.ttft), num(r.cached), num(r.computed), [r.cache || "–", "text"],
                                          num(r.output), r.tps ?? "–", secs(r.age), [r.session || "–", "text"]])),
       12, "no request yet");
}

function chart(id, points, key, scale, color, floor) {
  const c = document.getElementById(id);
  const w = c.clientWidth || c.width, h = c.clientHeight || c.height;
  const dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const now = Date.now() / 1000, span = 3600;
  const pts = points.filter((p) => p[key] !== null).map((p) => [p.t, p[key] * scale]);
  const max = pts.length ? Math.max(floor, ...pts.map((p) => p[1])) * 1.15 : floor;
  g.strokeStyle = "#263241"; g.fillStyle = "#8a99a8"; g.font = "11px system-ui, sans-serif";
  for (const f of [0, 0.5, 1]) {
    const y = h - 14 - f * (h - 24);
    g.beginPath(); g.moveTo(30, y); g.lineTo(w, y); g.stroke();
    const v = max * f;
    g.fillText(v >= 10 ? String(Math.round(v)) : String(Number(v.toPrecision(2))), 0, y + 4);
  }
  g.fillText("-60 min", 30, h - 1); g.fillText("now", w - 22, h - 1);
  if (!pts.length) { g.fillText("no data yet", w / 2 - 28, h / 2); return; }
  const x = (t) => 30 + (w - 32) * (1 - (now - t) / span);
  const y = (v) => h - 14 - (v / max) * (h - 24);
  g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.5;
  g.beginPath();
  pts.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[1])) : g.moveTo(x(p[0]), y(p[1]))));
  g.stroke();
  for (const p of pts) { g.beginPath(); g.arc(x(p[0]), y(p[1]), 2, 0, 7); g.fill(); }
}

function renderCharts(s) {
  const p = s.history.points;
  chart("c-wait", p, "wait", 1, "#d29922", 1);
  chart("c-ttft", p, "ttft", 1, "#58a6ff", 1);
  chart("c-hit", p, "hit", 100, "#3fb950", 100 / 1.15);
  chart("c-tps", p, "tps", 1, "#bc8cff", 10);
}

function setConn(text, ok) {
  const c = document.getElementById("conn");
  c.textContent = text;
  c.className = "pill " + (ok ? "ok" : "bad");
}

let timer = null;
async function poll() {
  clearTimeout(timer);
  try {
    const resp = await fetch(STATE_URL, { cache: "no-store" });
    if (resp.status === 401) {
      document.getElementById("login").hidden = false;
      setConn("not logged in", false);
    } else if (!resp.ok) {
      throw new Error(`HTTP ${resp.status}`);
    } else {
      const s = await resp.json();
      csrf = s.csrf;
      failures = 0;
      document.getElementById("login").hidden = true;
      setConn("live", true);
      document.getElementById("meta").textContent = `v${s.version} · up ${secs(s.uptime)}`;
      renderTiles(s); renderBackends(s); renderTables(s); renderCharts(s);
      document.body.dataset.updated = String(Date.now());
    }
  } catch (e) {
    failures += 1;
    setConn(`reconnecting… (${failures})`, false);
  }
  // Back off to 5 s while the gateway is away; every second while it answers.
  timer = setTimeout(poll, failures ? Math.min(5000, 1000 * failures) : 1000);
}

document.addEventListener("DOMContentLoaded", poll);
