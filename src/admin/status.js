// The status page: reads GET /status every 5 seconds and redraws in place (no page reload); the store
// and kick controls call the admin API with the X-Popgate-Admin header (and the bearer token, when the
// operator typed one: it stays in this tab's sessionStorage).
"use strict";

const REFRESH_MS = 5000;
// The last /status drawn, and when (by this browser's clock: rates are per minute of it).
let previous = null;
let previousAt = 0;
let refreshes = 0;

function token() { return sessionStorage.getItem("popgate-token") || ""; }

function headers() {
  const h = { "X-Popgate-Admin": "status-page" };
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function date(unix) {
  if (!unix) return "–";
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? "≤ " + Math.round(seconds * 1000) + " ms" : "≤ " + seconds + " s";
}

function sum(obj, keys) {
  return keys.reduce((n, k) => n + ((obj || {})[k] || 0), 0);
}

const REFUSED = ["rejected", "no_route", "throttled", "tls_required"];
const FAILED = ["temporary", "unavailable"];

// Per minute, from the difference to the last refresh; "–" on the first.
function perMinute(now, before, keys, dt) {
  if (!before || dt <= 0) return "–";
  return (Math.max(0, sum(now, keys) - sum(before, keys)) * 60 / dt).toFixed(1);
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}

function tenantRows(st, dt) {
  const before = new Map((previous ? previous.tenants : []).map(t => [t.name, t.logins]));
  return st.tenants.map(t => el("tr", { "data-tenant": t.name },
    el("td", {}, t.name),
    el("td", {}, t.domains.join(", ")),
    el("td", {}, t.balance),
    el("td", { class: "num sessions" }, t.sessions),
    el("td", { class: "num ok-rate" }, perMinute(t.logins, before.get(t.name), ["ok"], dt)),
    el("td", { class: "num refused-rate" }, perMinute(t.logins, before.get(t.name), REFUSED, dt)),
    el("td", { class: "num failed-rate" }, perMinute(t.logins, before.get(t.name), FAILED, dt)),
    el("td", { class: "num logins-ok" }, sum(t.logins, ["ok"]) + " ok / " +
      sum(t.logins, REFUSED) + " refused / " + sum(t.logins, FAILED) + " failed")));
}

function stateControls(s) {
  const cell = el("td", { class: "state " + s.state });
  cell.append(el("b", { class: "state-name" }, s.state), " ");
  for (const state of ["ready", "drain", "maint"]) {
    const b = el("button", { "data-store": s.store, "data-state": state, type: "button" }, state);
    b.disabled = state === s.state;
    b.addEventListener("click", () => control(s.store, { state }));
    cell.append(b, " ");
  }
  return cell;
}

function weightControl(s) {
  const input = el("input", { type: "number", min: "0", max: "1000", value: s.weight || 0, "data-store": s.store });
  const b = el("button", { type: "button" }, "set");
  b.addEventListener("click", () => control(s.store, { weight: input.value }));
  return el("td", { class: "weight" }, el("span", { class: "weight-value" }, s.weight || "configured"), " ", input, b);
}

function storeRows(st, dt) {
  const before = new Map((previous ? previous.stores : []).map(s => [s.store, s]));
  return st.stores.map(s => {
    const b = before.get(s.store);
    const rate = b && dt > 0
      ? Math.round((s.bytes_to_store + s.bytes_to_client - b.bytes_to_store - b.bytes_to_client) / dt)
      : "–";
    const probe = s.last_probe_at
      ? (s.last_probe_ok ? "ok " : "failed ") + age(st.now - s.last_probe_at) + " ago"
      : "none yet";
    return el("tr", { "data-store": s.store, class: s.up ? "up" : "down" },
      el("td", {}, s.store),
      el("td", {}, s.addr),
      el("td", { class: "health" }, (s.up ? "UP" : "DOWN") + " for " + age(st.now - s.up_since)),
      el("td", { class: "probe" }, probe),
      stateControls(s),
      weightControl(s),
      el("td", { class: "num sessions" }, s.sessions),
      el("td", { class: "num pool" }, s.pool_idle),
      el("td", { class: "num waiting" }, s.logins_in_flight),
      el("td", { class: "num" }, ms(s.connect_p95_seconds)),
      el("td", { class: "num" }, ms(s.login_p95_seconds)),
      el("td", { class: "num bytes-rate" }, rate),
      el("td", {}, s.tenants.join(", ")));
  });
}

function certificateRows(st) {
  return st.certificates.map(c => {
    const left = c.not_after - st.now;
    const cls = left < 3 * 86400 ? "down" : left < 14 * 86400 ? "warn" : "";
    return el("tr", { "data-certificate": c.certificate, class: cls },
      el("td", {}, c.tenant), el("td", {}, c.certificate), el("td", {}, date(c.not_after)),
      el("td", { class: "num" }, left > 0 ? age(left) : "EXPIRED"));
  });
}

function render(st) {
  const at = Date.now() / 1000;
  const dt = previous ? at - previousAt : 0;
  document.getElementById("version").textContent = st.version;
  const state = document.getElementById("state");
  state.textContent = st.draining ? "draining" : st.ready ? "ready" : "not ready";
  state.className = st.ready ? "up" : "down";
  document.getElementById("sessions").textContent = st.sessions;
  document.getElementById("uptime").textContent = age(st.uptime_seconds);
  document.getElementById("started").textContent = date(st.started_at);
  document.getElementById("updated").textContent = date(st.now);
  fill("tenants", tenantRows(st, dt));
  fill("stores", storeRows(st, dt));
  fill("certificates", certificateRows(st));
  fill("listeners", st.listeners.map(l => el("tr", { "data-listener": l.name },
    el("td", {}, l.name), el("td", {}, l.addr), el("td", {}, l.tls || "none"))));
  fill("reloads", st.reloads.slice().reverse().map(r => el("tr", { class: r.ok ? "up" : "down" },
    el("td", {}, date(r.at_unix)), el("td", {}, age(st.now - r.at_unix) + " ago"),
    el("td", {}, r.ok ? "ok" : "refused"), el("td", {}, r.message))));
  previous = st;
  previousAt = at;
  refreshes += 1;
  document.body.dataset.refreshes = String(refreshes);
}

async function refresh() {
  try {
    const r = await fetch("/status", { headers: headers(), cache: "no-store" });
    if (r.status === 401) {
      document.getElementById("auth").hidden = false;
      throw new Error("the admin API wants its token");
    }
    if (!r.ok) throw new Error("GET /status: HTTP " + r.status);
    render(await r.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e.message || e);
  }
}

async function post(path, params) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== undefined));
  const r = await fetch(path + "?" + q, { method: "POST", headers: headers() });
  const text = await r.text();
  if (!r.ok) throw new Error(path + ": " + text.trim());
  return JSON.parse(text);
}

async function control(store, change) {
  try {
    await post("/stores/state", Object.assign({ store }, change));
  } catch (e) {
    document.getElementById("error").textContent = String(e.message || e);
  }
  refresh();
}

document.getElementById("kick").addEventListener("submit", async ev => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const out = document.getElementById("kick-result");
  try {
    const r = await post("/kick", Object.fromEntries(form.entries()));
    out.textContent = "kicked " + r.kicked + (r.complete === false ? " (not every replica answered)" : "");
  } catch (e) {
    out.textContent = String(e.message || e);
  }
  refresh();
});

document.getElementById("token-save").addEventListener("click", () => {
  sessionStorage.setItem("popgate-token", document.getElementById("token").value);
  document.getElementById("auth").hidden = true;
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
