"""The dashboard page at ``/``: one HTML document, inline CSS and JS, no build step, no CDN.

Every second it polls ``/api/stats`` and ``/tenants`` and shows the cap, the connections open,
in use and idle, the checkouts waiting, the manager's health, the last minute's checkouts per
second and waiting checkouts as sparklines, each pool with the tenants and isolation models it
serves, and each tenant with its isolation model and pool.
"""

from __future__ import annotations

__all__ = ["DASHBOARD_HTML"]

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tenantpool demo</title>
<style>
  :root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #e3e6eb;
          --use: #2f6fdf; --idle: #9ec1f7; --wait: #d97706; --ok: #1f9d55; --warn: #d97706;
          --bad: #dc2626; --rls: #2f6fdf; --schema: #7c3aed; --database: #0f766e;
          --role: #b45309; }
  * { box-sizing: border-box; }
  body { margin: 0; padding: 20px 28px; background: var(--bg); color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
  header { display: flex; align-items: baseline; gap: 14px; margin-bottom: 12px; }
  h1 { font-size: 21px; margin: 0; }
  h2 { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
       margin: 0 0 6px; font-weight: 600; }
  .badge { padding: 2px 10px; border-radius: 999px; color: #fff; background: var(--muted);
           font-weight: 600; font-size: 12px; }
  .badge.ok { background: var(--ok); } .badge.degraded { background: var(--warn); }
  .badge.failing, .badge.unreachable { background: var(--bad); }
  #reasons { color: var(--warn); }
  .cards { display: grid; grid-template-columns: repeat(6, minmax(110px, 1fr)); gap: 10px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
          padding: 10px 12px; }
  .label { color: var(--muted); font-size: 11px; text-transform: uppercase;
           letter-spacing: .04em; }
  .value { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
  .bar { display: flex; height: 8px; border-radius: 4px; background: var(--line);
         overflow: hidden; margin-top: 6px; min-width: 70px; }
  .bar .use { background: var(--use); } .bar .idle { background: var(--idle); }
  .charts { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin: 10px 0; }
  .chart svg { width: 100%; height: 64px; display: block; }
  .chart polyline { fill: none; stroke-width: 2; vector-effect: non-scaling-stroke; }
  #rate-line { stroke: var(--use); } #waiting-line { stroke: var(--wait); }
  #in-use-line { stroke: var(--idle); }
  .legend { color: var(--muted); font-size: 12px; }
  .legend b { font-variant-numeric: tabular-nums; color: var(--ink); }
  .swatch { display: inline-block; width: 10px; height: 3px; vertical-align: middle;
            margin-right: 4px; }
  .tables { display: grid; grid-template-columns: 3fr 2fr; gap: 10px; align-items: start; }
  .scroll { max-height: 340px; overflow-y: auto; border: 1px solid var(--line);
            border-radius: 8px; background: var(--card); }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); }
  th { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em;
       position: sticky; top: 0; background: var(--card); }
  td.num { font-variant-numeric: tabular-nums; }
  td.name { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;
            word-break: break-all; }
  .iso { display: inline-block; padding: 0 7px; border-radius: 4px; color: #fff;
         font-size: 12px; font-weight: 600; margin-right: 3px; }
  .iso.rls { background: var(--rls); } .iso.schema { background: var(--schema); }
  .iso.database { background: var(--database); } .iso.role { background: var(--role); }
  tr.empty td { color: var(--muted); }
  footer { color: var(--muted); font-size: 12px; margin-top: 10px; }
</style>
</head>
<body data-loaded="false">
<header>
  <h1>tenantpool demo</h1>
  <span id="status" class="badge">loading</span>
  <span id="reasons"></span>
</header>
<section class="cards">
  <div class="card"><div class="label">cap</div><div class="value" id="cap">-</div>
    <div class="bar" title="connections in use and idle, against the cap">
      <div class="use" id="cap-use"></div><div class="idle" id="cap-idle"></div></div></div>
  <div class="card"><div class="label">open</div><div class="value" id="total">-</div></div>
  <div class="card"><div class="label">in use</div><div class="value" id="in-use">-</div></div>
  <div class="card"><div class="label">idle</div><div class="value" id="idle">-</div></div>
  <div class="card"><div class="label">waiting</div><div class="value" id="waiting">-</div></div>
  <div class="card"><div class="label">checkouts / s</div>
    <div class="value" id="rate">-</div></div>
</section>
<section class="charts">
  <div class="card chart">
    <h2>checkouts per second, last minute</h2>
    <svg viewBox="0 0 60 100" preserveAspectRatio="none"><polyline id="rate-line" points=""/></svg>
    <div class="legend"><span class="swatch" style="background: var(--use)"></span>checkouts/s
      &middot; peak <b id="rate-peak">-</b></div>
  </div>
  <div class="card chart">
    <h2>connections in use and checkouts waiting, last minute</h2>
    <svg viewBox="0 0 60 100" preserveAspectRatio="none"><polyline id="in-use-line" points=""/>
      <polyline id="waiting-line" points=""/></svg>
    <div class="legend"><span class="swatch" style="background: var(--idle)"></span>in use
      &middot; <span class="swatch" style="background: var(--wait)"></span>waiting
      &middot; peak waiting <b id="waiting-peak">-</b></div>
  </div>
</section>
<section class="tables">
  <div>
    <h2>pools (no passwords)</h2>
    <div class="scroll"><table>
      <thead><tr><th>pool</th><th>serves</th><th>in use</th><th>idle</th><th>waiting</th>
        <th>size / max</th><th></th></tr></thead>
      <tbody id="pools"><tr class="empty"><td colspan="7">no pools yet</td></tr></tbody>
    </table></div>
  </div>
  <div>
    <h2>tenants (<span id="tenant-count">0</span>)</h2>
    <div class="scroll"><table>
      <thead><tr><th>tenant</th><th>isolation</th><th>pool</th></tr></thead>
      <tbody id="tenants"><tr class="empty"><td colspan="3">no tenants yet</td></tr></tbody>
    </table></div>
  </div>
</section>
<footer>checkouts <span id="checkouts">-</span> &middot; timeouts <span id="timeouts">-</span>
  &middot; steals <span id="steals">-</span> &middot; updated <span id="updated">never</span>
  &middot; <a href="/docs">API</a> &middot; <a href="/metrics">metrics</a></footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const MAX_TENANT_ROWS = 200;

function setText(id, value) { $(id).textContent = String(value); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function bar(inUse, idle, max) {
  const wrap = el("div", undefined, "bar");
  for (const [cls, n] of [["use", inUse], ["idle", idle]]) {
    const part = el("div", undefined, cls);
    part.style.width = (max > 0 ? (100 * n) / max : 0) + "%";
    wrap.appendChild(part);
  }
  return wrap;
}

function isoBadge(isolation) { return el("span", isolation, "iso " + isolation); }

// A sparkline of values over the last minute, scaled to [0, top]: one point per second.
function sparkline(id, values, top) {
  const scale = top > 0 ? top : 1;
  const offset = 60 - values.length;
  $(id).setAttribute("points", values.map(
    (v, i) => (offset + i) + "," + (100 - (96 * v) / scale).toFixed(1)).join(" "));
}

function emptyRow(text, span) {
  const tr = el("tr", undefined, "empty");
  const td = el("td", text);
  td.colSpan = span;
  tr.appendChild(td);
  return tr;
}

function renderStats(s, byPool) {
  const status = $("status");
  status.textContent = s.status;
  status.className = "badge " + s.status;
  setText("reasons", s.reasons.join("; "));
  setText("cap", s.cap === null ? "none" : s.cap);
  setText("total", s.total);
  setText("in-use", s.in_use);
  setText("idle", s.idle);
  setText("waiting", s.waiting);
  setText("checkouts", s.checkouts);
  setText("timeouts", s.timeouts);
  setText("steals", s.steals);
  const cap = s.cap === null ? Math.max(s.total, 1) : s.cap;
  $("cap-use").style.width = (100 * s.in_use) / cap + "%";
  $("cap-idle").style.width = (100 * s.idle) / cap + "%";

  const h = s.history;
  const rates = h.map((x) => x.checkouts_per_s);
  const waiting = h.map((x) => x.waiting);
  const inUse = h.map((x) => x.in_use);
  setText("rate", h.length ? Math.round(rates[rates.length - 1]) : "-");
  const ratePeak = Math.max(0, ...rates);
  setText("rate-peak", Math.round(ratePeak));
  sparkline("rate-line", rates, ratePeak);
  const top = Math.max(1, ...waiting, ...inUse);
  setText("waiting-peak", Math.max(0, ...waiting));
  sparkline("in-use-line", inUse, top);
  sparkline("waiting-line", waiting, top);

  const rows = s.pools.map((p) => {
    const tr = el("tr");
    tr.dataset.pool = p.name;
    const serves = el("td");
    const users = byPool.get(p.name) || [];
    for (const iso of [...new Set(users.map((t) => t.isolation))].sort()) {
      serves.appendChild(isoBadge(iso));
    }
    serves.appendChild(document.createTextNode(
      users.length + (users.length === 1 ? " tenant" : " tenants")));
    tr.append(el("td", p.name, "name"), serves, el("td", p.in_use, "num"),
              el("td", p.idle, "num"), el("td", p.waiting, "num"),
              el("td", p.size + " / " + p.max_size, "num"));
    const td = el("td");
    td.appendChild(bar(p.in_use, p.idle, p.max_size));
    tr.appendChild(td);
    return tr;
  });
  if (rows.length === 0) rows.push(emptyRow("no pools yet: create a tenant and a note", 7));
  $("pools").replaceChildren(...rows);
}

function renderTenants(tenants) {
  setText("tenant-count", tenants.length);
  const rows = tenants.slice(0, MAX_TENANT_ROWS).map((t) => {
    const tr = el("tr");
    tr.dataset.tenant = t.id;
    const iso = el("td");
    iso.appendChild(isoBadge(t.isolation));
    tr.append(el("td", t.id, "name"), iso, el("td", t.pool, "name"));
    return tr;
  });
  if (tenants.length > MAX_TENANT_ROWS) {
    rows.push(emptyRow("and " + (tenants.length - MAX_TENANT_ROWS) + " more", 3));
  }
  if (rows.length === 0) rows.push(emptyRow("no tenants yet: POST /tenants", 3));
  $("tenants").replaceChildren(...rows);
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  try {
    const [stats, tenants] = await Promise.all([getJson("/api/stats"), getJson("/tenants")]);
    const byPool = new Map();
    for (const t of tenants) {
      if (!byPool.has(t.pool)) byPool.set(t.pool, []);
      byPool.get(t.pool).push(t);
    }
    renderStats(stats, byPool);
    renderTenants(tenants);
    setText("updated", new Date().toLocaleTimeString());
    document.body.dataset.loaded = "true";
  } catch (err) {
    const status = $("status");
    status.textContent = "unreachable";
    status.className = "badge unreachable";
  }
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
