// regionshift's live page: plain JavaScript and SVG, served by the daemon, talking to nobody else.
// It follows GET /api/v1/events (a snapshot, then typed events), re-reads GET /api/v1/state and
// GET /api/v1/audit when something changed, and says so at once when the stream or the data stop.
"use strict";

const HEARTBEAT = 15; // seconds between the stream's heartbeats (controller.web.stream.HEARTBEAT)
const SILENT = 2 * HEARTBEAT + 5; // a stream this long silent is taken for dead
const REFRESH = 2; // seconds between re-reads of the state (results carry no events)
const AUDIT_EVERY = 10; // seconds between re-reads of the audit when nothing changed
const READ_TIMEOUT = 5000; // ms a read of the state or the audit may take
const MIN_GAP = 500; // ms between two reads of the same thing, however many events come
const HOUR = 3600;
const SYMBOLS = { healthy: "✓", degraded: "▲", unhealthy: "✗", unknown: "?" };
const CELL_SYMBOLS = { ok: "✓", failing: "✗", stale: "?", "set aside": "⊘", "no data": "-" };
const COLOURS = ["#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df", "#cf222e", "#57606a"];
const DASHES = ["", "6 3", "2 2", "8 3 2 3", "1 3", "10 4", "4 4"]; // never colour alone

const page = {
  state: null, // GET /api/v1/state, or the stream's snapshot
  offset: 0, // the daemon's clock minus this browser's, in seconds
  audit: [], // GET /api/v1/audit: the weight changes, newest first
  operators: [], // and the operators' actions
  live: false,
  lostAt: null, // when the stream was lost (this browser's clock, seconds)
  lastError: "",
  lastId: null,
  fetchedAt: 0, // when the state was last read (this browser's clock)
  eventAt: 0, // the newest event applied (server time): an older state read is not shown
  history: [], // the verdict changes of the last hour: the snapshot's, then each event's
  stateError: null,
  auditError: null,
  drawn: {}, // each section's data when last drawn: an unchanged section is left alone
};

// --- DOM -----------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// Draws a section only when its data changed: buttons under the pointer, focus and selections
// survive the reads every few seconds.
function draw(id, data, build) {
  const key = JSON.stringify(data);
  if (page.drawn[id] === key) return;
  page.drawn[id] = key;
  replace(id, build());
}

function replace(id, ...children) {
  const target = document.getElementById(id);
  const open = new Set([...target.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  target.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
  for (const d of target.querySelectorAll("details")) if (open.has(d.dataset.key)) d.open = true;
}

// --- time ----------------------------------------------------------------------------------

const localNow = () => Date.now() / 1000;
const serverNow = () => localNow() + page.offset;

function age(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
}

// A configured wait: to the tenth of a second below ten seconds (tests and demos scale time down).
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return seconds < 10 ? `${Math.round(seconds * 10) / 10}s` : age(seconds);
}

function clock(epoch) {
  if (!epoch) return "-";
  return new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

// Text that counts by itself: ages grow from `at` (a server time), countdowns shrink to it.
function ageOf(at) {
  return h("span", { "data-since": at }, at ? age(serverNow() - at) : "-");
}
function countdown(until) {
  return h("span", { class: "countdown", "data-until": until }, age(until - serverNow()));
}
function tick() {
  for (const el of document.querySelectorAll("[data-since]")) el.textContent = age(serverNow() - Number(el.dataset.since));
  for (const el of document.querySelectorAll("[data-until]")) {
    const left = Number(el.dataset.until) - serverNow();
    el.textContent = left > 0 ? age(left) : "due";
  }
  banner();
}

// --- the live stream -----------------------------------------------------------------------

function parseBlock(block) {
  const event = { type: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event.type = value;
    else if (field === "id") event.id = value;
    else if (field === "data") event.data.push(value);
  }
  return event;
}

async function follow() {
  let backoff = 1;
  for (;;) {
    const abort = new AbortController();
    let heard = localNow();
    const watchdog = setInterval(() => {
      if (localNow() - heard > SILENT) abort.abort(new Error(`no heartbeat for ${SILENT} s`));
    }, 1000);
    try {
      const headers = { Accept: "text/event-stream" };
      if (page.lastId) headers["Last-Event-ID"] = page.lastId;
      const response = await fetch("/api/v1/events", { headers, cache: "no-store", signal: abort.signal });
      if (!response.ok) throw new Error(`the daemon answered ${response.status}`);
      // Connected: live again, whether a snapshot follows or (resumed with nothing missed) only
      // heartbeats do. What happened meanwhile comes as events, and the state is read again.
      page.live = true;
      page.lostAt = null;
      refreshSoon(0);
      banner();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) throw new Error("the daemon closed the stream");
        heard = localNow();
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.id) page.lastId = event.id;
          if (event.data.length) apply(event);
        }
        backoff = 1;
      }
    } catch (error) {
      lost(abort.signal.aborted ? String(abort.signal.reason?.message || abort.signal.reason) : error.message);
    } finally {
      clearInterval(watchdog);
    }
    await new Promise((resolve) => setTimeout(resolve, backoff * 1000));
    backoff = Math.min(backoff * 2, 10);
  }
}

// An event the page cannot apply is said (and the state read again), never taken for a lost stream.
function apply(event) {
  try {
    receive(event.type, JSON.parse(event.data.join("\n")));
  } catch (error) {
    notice(`The page could not apply a ${event.type} event (${error.message}); reading the state again.`, true);
    refreshSoon(0);
  }
}

function lost(why) {
  if (page.live || page.lostAt === null) page.lostAt = localNow();
  page.live = false;
  page.lastError = why || "connection lost";
  banner();
}

function receive(type, data) {
  if (type === "snapshot") {
    page.history = data.verdict_history || [];
    setState(data);
    loadAudit();
    return;
  }
  const state = page.state;
  if (!state) return;
  page.eventAt = Math.max(page.eventAt, data.at || 0);
  // Show what the event says at once; the full state follows from the next read.
  if (type === "verdict") {
    const region = state.regions.find((r) => r.name === data.region);
    if (region) {
      region.verdict = { ...(region.verdict || {}), status: data.to, reasons: data.reasons, since: data.at, at: data.at };
    }
    page.history.push({ region: data.region, at: data.at, from: data.from, to: data.to });
    page.history = page.history.filter((e) => e.at >= data.at - HOUR);
  } else if (type === "ramp") {
    const ramp = state.ramps.find((r) => r.name === data.ramp);
    if (ramp) {
      const share = data.step >= 0 ? ramp.plan[data.step] : 0;
      Object.assign(ramp, { status: data.status, reason: data.reason, step: data.step + 1, share, bake_until: null });
    }
  }
  render();
  // The rest (weights, bake, evidence) comes with the state, read at once.
  if (["action", "operator", "drift", "ramp"].includes(type)) loadAudit();
  refreshSoon(0);
}

// A read done at most one request at a time and at most once every MIN_GAP ms: `soon(ms)` asks
// for it (a request asked for sooner is never pushed back, so a busy stream cannot starve the
// reads; one asked for while a request is in flight follows it; a burst of events costs one read
// a MIN_GAP, not one each), and each read says when the next is due.
function poller(read) {
  const self = { busy: false, again: false, timer: null, due: Infinity, last: 0 };
  self.soon = (delay) => {
    const due = Math.max(Date.now() + delay, self.last + MIN_GAP);
    delay = due - Date.now();
    if (due >= self.due) return;
    clearTimeout(self.timer);
    self.due = due;
    self.timer = setTimeout(run, delay);
  };
  async function run() {
    self.due = Infinity;
    if (self.busy) {
      self.again = true;
      return;
    }
    self.busy = true;
    self.last = Date.now();
    let next = REFRESH * 1000;
    try {
      next = await read();
    } finally {
      self.busy = false;
      const again = self.again;
      self.again = false;
      self.soon(again ? 0 : next);
    }
  }
  return self;
}

function failure(what, error) {
  return error.name === "TimeoutError" ? `${what}: no answer in ${READ_TIMEOUT / 1000} s` : `${what}: ${error.message}`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", signal: AbortSignal.timeout(READ_TIMEOUT) });
  if (!response.ok) throw new Error(`the daemon answered ${response.status}`);
  return response.json();
}

// The state: every REFRESH seconds (results carry no events), and at once after each event.
const stateReads = poller(async () => {
  try {
    const state = await getJSON("/api/v1/state?history=0");
    // A read that began before the newest event applied would take the page back: read again.
    if (state.generated_at < page.eventAt) return 0;
    setState(state);
  } catch (error) {
    page.stateError = failure("reading the state", error);
    banner();
  }
  return REFRESH * 1000;
});
const refreshSoon = stateReads.soon;

function setState(state) {
  page.state = state;
  page.offset = state.generated_at - localNow();
  page.fetchedAt = localNow();
  page.stateError = null;
  render();
}

// The audit of the last hour: after each change, and every AUDIT_EVERY seconds (an INSYNC time
// can be learned well after its change).
const auditReads = poller(async () => {
  try {
    const audit = await getJSON(`/api/v1/audit?since=${Math.floor(serverNow() - HOUR)}&limit=500`);
    page.audit = audit.changes;
    page.operators = audit.operator_actions;
    page.auditError = null;
    render();
  } catch (error) {
    page.auditError = failure("reading the audit", error);
    banner();
  }
  return AUDIT_EVERY * 1000;
});
const loadAudit = () => auditReads.soon(150);

// --- banners ---------------------------------------------------------------------------------

// The newest result any vantage holds of any region, as a server time (null: none yet).
function newestResult(state) {
  let newest = null;
  for (const region of state.regions) {
    for (const cell of Object.values(region.vantages || {})) {
      if (cell.newest_age === null || cell.newest_age === undefined) continue;
      const at = state.generated_at - cell.newest_age;
      if (newest === null || at > newest) newest = at;
    }
  }
  return newest;
}

function banner() {
  const el = document.getElementById("banner");
  const state = page.state;
  let text = null;
  if (!page.live && page.lostAt !== null) {
    const since = age(localNow() - page.lostAt);
    text = `⚠ Live updates lost ${since} ago (${page.lastError}). What you see is from ${clock(state?.generated_at)} and may be out of date. Reconnecting…`;
  } else if (page.stateError) {
    text = `⚠ ${page.stateError}. What you see is from ${clock(state?.generated_at)} and may be out of date.`;
  } else if (state && localNow() - page.fetchedAt > 3 * REFRESH) {
    text = `⚠ The state has not been read for ${age(localNow() - page.fetchedAt)}: it may be out of date.`;
  } else if (state) {
    const newest = newestResult(state);
    const up = state.generated_at - state.started_at;
    if (newest !== null && state.generated_at - newest > state.stale_after) {
      text = `⚠ No probe result from any vantage for ${age(state.generated_at - newest)}: the verdicts are stale.`;
    } else if (newest === null && up > state.stale_after) {
      text = `⚠ No probe result from any vantage in the results kept (the daemon has run ${age(up)}): the verdicts are stale.`;
    }
  }
  if (text === null && page.auditError) text = `⚠ ${page.auditError}: the audit trail may be out of date.`;
  el.hidden = text === null;
  el.textContent = text || "";
  document.title = text ? "⚠ regionshift (stale)" : "regionshift";
}

function notice(text, isError) {
  const el = document.getElementById("notice");
  el.hidden = !text;
  el.textContent = text || "";
  el.classList.toggle("error", Boolean(isError));
}

// --- rendering --------------------------------------------------------------------------------

function statusLabel(status, symbols = SYMBOLS) {
  const word = status || "unknown";
  return h("span", { class: `status s-${word.replace(/ /g, "-")}` }, `${symbols[word] || "?"} ${word}`);
}

function render() {
  const state = page.state;
  if (!state) return;
  const where = document.getElementById("where");
  const n = (count, what) => `${count} ${what}${count === 1 ? "" : "s"}`;
  where.textContent = `vantage ${state.vantage} · ${n(state.regions.length, "region")} · ${n(state.vantages.length, "vantage")}`;
  document.getElementById("mode").textContent = state.no_actions || "";
  const frozen = document.getElementById("frozen");
  frozen.hidden = !state.frozen;
  frozen.textContent = state.frozen ? `❄ FROZEN by ${state.frozen.by}: ${state.frozen.reason}. No weight changes until unfrozen.` : "";
  renderControls(state);
  renderSummary(state);
  renderRegions(state);
  renderRecords(state);
  renderRamps(state);
  renderAudit();
  banner();
  if (!page.rendered) {
    page.rendered = true;
    performance.mark("regionshift:first-render"); // bench/page_load.py reads it
  }
}

// One line that answers "is anything wrong, and what is regionshift doing about it".
function renderSummary(state) {
  draw("summary", [state.regions.map((r) => [r.name, r.verdict?.status]), state.ramps, state.record_sets], () => summary(state));
}

function summary(state) {
  const bad = state.regions.filter((r) => (r.verdict?.status || "unknown") !== "healthy");
  const parts = [];
  if (!bad.length) parts.push(h("span", { class: "status s-healthy" }, `✓ all ${state.regions.length} regions healthy`));
  for (const r of bad) {
    parts.push(statusLabel(r.verdict?.status), ` ${r.name}`, " · ");
  }
  if (bad.length) parts.pop();
  for (const ramp of state.ramps) {
    if (["pending", "done"].includes(ramp.status)) continue;
    parts.push(` · ramp ${ramp.name} ${rampSymbol(ramp.status)} ${ramp.status.replace("_", " ")} at ${ramp.share}%`);
  }
  for (const rs of state.record_sets) {
    const now = rs.members.filter((m) => m.observed_share !== null).map((m) => `${m.region} ${share(m.observed_share)}`);
    if (now.length) parts.push(` · ${rs.name}: ${now.join(", ")}`);
    if (rs.drift) parts.push(" · ", h("span", { class: "status s-degraded" }, `⚠ drift on ${rs.key}`));
    if (rs.actuation) parts.push(" · ", h("span", { class: "status s-degraded" }, `⚠ ${rs.key}: ${rs.actuation}`));
  }
  // The agents' vantages, when any: a broker gone or an agent away left "all regions healthy"
  // on top while the verdicts stood on fewer vantages than configured.
  const agents = state.agents;
  if (agents && !agents.connected) {
    parts.push(" · ", h("span", { class: "status s-degraded" }, `⚠ agents' broker ${agents.broker} not connected`));
  } else if (agents) {
    const away = Object.entries(agents.vantages || {}).filter(([, a]) => a.state !== "online");
    if (away.length) {
      const said = away.map(([vantage, a]) => `${vantage} ${a.state}`).join(", ");
      parts.push(" · ", h("span", { class: "status s-degraded" }, `⚠ agents: ${said}`));
    }
  }
  return h("p", {}, parts);
}

function renderControls(state) {
  const who = sessionStorage.getItem("regionshift.operator");
  draw("controls", [state.actions, Boolean(state.frozen), who], () => {
    if (!state.actions) return [];
    const button = state.frozen
      ? h("button", { id: "unfreeze", onclick: () => act("unfreeze") }, "Unfreeze")
      : h("button", { id: "freeze", onclick: () => act("freeze") }, "❄ Freeze all changes");
    return [who ? h("span", {}, `signed in as ${who} `) : null, button];
  });
}

function renderRegions(state) {
  draw("regions", [state.regions, state.vantages], () => regionTable(state));
}

function regionTable(state) {
  const head = h("tr", {}, h("th", {}, "Region"), h("th", {}, "Verdict"), h("th", {}, "Reason"),
    state.vantages.map((v) => h("th", { scope: "col" }, `from ${v}`)));
  const rows = state.regions.map((region) => {
    const verdict = region.verdict || { status: "unknown", reasons: ["no verdict yet"] };
    const reasons = verdict.reasons || [];
    return h("tr", { "data-region": region.name },
      h("th", { scope: "row" }, region.name),
      h("td", { class: "verdict" }, statusLabel(verdict.status), h("br"),
        h("span", { class: "muted" }, "for ", ageOf(verdict.since))),
      h("td", {},
        h("div", { class: "reason", title: reasons.join("\n") }, reasons[0] || "-"),
        h("details", { "data-key": `evidence-${region.name}` }, h("summary", {}, "evidence"),
          reasons.length > 1 ? h("ul", {}, reasons.map((r) => h("li", {}, r))) : null,
          h("pre", {}, JSON.stringify(verdict.evidence || {}, null, 1)))),
      state.vantages.map((v) => vantageCell(state, region.vantages?.[v])));
  });
  return h("table", { id: "region-table" }, h("thead", {}, head), h("tbody", {}, rows));
}

function vantageCell(state, cell) {
  if (!cell) return h("td", {}, statusLabel("no data", CELL_SYMBOLS));
  const failing = Object.entries(cell.failing || {});
  const newestAt = cell.newest_age === null ? null : state.generated_at - cell.newest_age;
  return h("td", { class: "cell", "data-status": cell.status },
    statusLabel(cell.status, CELL_SYMBOLS), h("br"),
    newestAt === null ? null : h("span", { class: "muted" }, `newest ${ageOf(newestAt)} ago`),
    newestAt === null ? null : h("br"),
    h("span", { class: "muted" }, `${cell.results} results/min`),
    failing.length ? h("div", { class: cell.status === "failing" ? null : "muted" },
      failing.map(([probe, n]) => `${probe}: ${n} failed`).join(", ")) : null,
    cell.why ? h("div", { class: "muted" }, cell.why) : null);
}

function share(value) {
  return value === null || value === undefined ? "-" : `${Math.round(value * 10) / 10}%`;
}

function renderRecords(state) {
  draw("records", [state.record_sets, state.actions], () => recordCards(state));
  // The charts move with the clock: drawn every time.
  for (const rs of state.record_sets) {
    document.querySelector(`[data-record="${CSS.escape(rs.key)}"] .chart-box`)?.replaceChildren(chart(state, rs));
  }
}

function recordCards(state) {
  if (!state.record_sets.length) return h("p", { class: "muted" }, "No record sets configured.");
  return state.record_sets.map((rs) => {
    const owner = rs.owner ? `owned by ${rs.owner}` : "owned by nobody (regionshift holds the last weights it wrote)";
    const rows = rs.members.map((m) => {
      const differs = m.desired_weight !== null && m.desired_weight !== m.observed_weight;
      return h("tr", {},
        h("td", {}, m.set_identifier), h("td", {}, m.region),
        h("td", { class: "observed" }, weightCell(m.observed_weight, m.observed_share)),
        h("td", { class: "desired" }, weightCell(m.desired_weight, m.desired_share), differs ? " ⇐ moving" : ""));
    });
    return h("div", { class: "card", "data-record": rs.key },
      h("h3", {}, rs.key, " ", h("span", { class: "muted" }, `TTL ${rs.ttl}s`)),
      h("div", { class: "reason owner", title: rs.reason || "" }, `${owner}${rs.reason ? `: ${rs.reason}` : ""}`),
      rs.drift ? h("div", { class: "drift" }, `⚠ DRIFT: ${rs.drift}. regionshift holds this record until the drift ends or it is adopted. `,
        actionable(state) ? h("button", { class: "adopt", onclick: () => act("adopt", rs.key) }, "Adopt Route 53's weights") : null) : null,
      trouble(rs) ? h("div", { class: "error-line" }, `✗ ${trouble(rs)}`) : null,
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Member"), h("th", {}, "Region"),
        h("th", {}, "Route 53 now (share)"), h("th", {}, "Desired (share)"))), h("tbody", {}, rows)),
      h("div", { class: "chart-box" }));
  });
}

// Why a record set's weights cannot move now: what /healthz says (an error, or Route 53 not read
// for long: a hung request raises no error while it hangs), else the last request's error.
function trouble(rs) {
  return rs.actuation || (rs.error ? `Route 53: ${rs.error}` : null);
}

function weightCell(weight, pct) {
  if (weight === null || weight === undefined) return "-";
  return [String(weight), " ", h("span", { class: "muted" }, `(${share(pct)})`)];
}

function actionable(state) {
  return state.actions;
}

// The share each region had of the record set over the last hour (from the audit: each applied
// change's weights), its verdict under it, and every change marked. A younger daemon's chart
// spans its life so far (a minute at least), not an hour it did not see.
function chart(state, rs) {
  const W = 900, H = 150, left = 120, right = 130, top = 12, stripH = 14;
  const regions = [...new Set(rs.members.map((m) => m.region))];
  const end = serverNow();
  const start = Math.min(end - 60, Math.max(end - HOUR, state.started_at - 5));
  const span = end - start;
  const x = (t) => left + ((Math.min(Math.max(t, start), end) - start) / span) * (W - left - right);
  const y = (pct) => top + (1 - pct / 100) * (H - top - 20);
  const changes = page.audit.filter((c) => c.record === rs.key && c.outcome === "applied" && c.to).slice().reverse();
  const weightsToShares = (weights) => {
    const byRegion = {};
    let total = 0;
    for (const m of rs.members) {
      const w = weights?.[m.set_identifier] ?? 0;
      byRegion[m.region] = (byRegion[m.region] || 0) + w;
      total += w;
    }
    const members = rs.members.length; // all weights 0: Route 53 answers each member alike
    for (const r of regions) {
      const alike = (100 * rs.members.filter((m) => m.region === r).length) / members;
      byRegion[r] = total ? (100 * byRegion[r]) / total : alike;
    }
    return byRegion;
  };
  const now = {};
  for (const m of rs.members) now[m.set_identifier] = m.observed_weight ?? 0;
  const points = [[start, weightsToShares(changes.length && changes[0].from ? changes[0].from : now)]];
  for (const c of changes) points.push([c.at, weightsToShares(c.to)]);
  points.push([end, weightsToShares(now)]);
  const parts = [];
  for (const pct of [0, 25, 50, 75, 100]) {
    parts.push(s("line", { class: "grid", x1: left, x2: W - right, y1: y(pct), y2: y(pct) }));
    parts.push(s("text", { x: left - 4, y: y(pct) + 4, "text-anchor": "end" }, `${pct}%`));
  }
  for (const fraction of [1, 0.75, 0.5, 0.25]) {
    parts.push(s("text", { x: x(end - fraction * span), y: H - 4, "text-anchor": "middle" }, `-${age(fraction * span)}`));
  }
  parts.push(s("text", { x: x(end), y: H - 4, "text-anchor": "end" }, "now"));
  // Each region's line ends in its name and share; the names are kept 12 px apart.
  const labels = [];
  regions.forEach((region, i) => {
    let d = "";
    points.forEach(([t, shares], k) => {
      d += k === 0 ? `M${x(t)},${y(shares[region])}` : `H${x(t)}V${y(shares[region])}`;
    });
    const colour = COLOURS[i % COLOURS.length];
    const last = points[points.length - 1][1][region];
    parts.push(s("path", { class: "share", d, stroke: colour, "stroke-dasharray": DASHES[i % DASHES.length] },
      s("title", {}, `${region}: share of ${rs.key}`)));
    labels.push({ y: y(last) + 4, text: `${region} ${share(last)}`, colour });
  });
  labels.sort((a, b) => a.y - b.y);
  labels.forEach((label, i) => {
    if (i > 0) label.y = Math.max(label.y, labels[i - 1].y + 12);
    parts.push(s("text", { x: W - right + 6, y: label.y, fill: label.colour }, label.text));
  });
  let labelled = -Infinity; // where the last change's name ends: names never overlap
  for (const c of changes) {
    if (c.at < start) continue;
    parts.push(s("line", { class: "mark", x1: x(c.at), x2: x(c.at), y1: top, y2: H - 18 },
      s("title", {}, `${clock(c.at)} ${c.action} by ${c.actor}: ${c.reason}`)));
    if (x(c.at) > labelled) {
      parts.push(s("text", { class: "mark-label", x: x(c.at) + 2, y: top - 2 }, `▼ ${c.action}`));
      labelled = x(c.at) + 8 * (c.action.length + 2);
    }
  }
  // Operators' actions on this record set (its ramps, a freeze, an adopt): a ◆ on the axis.
  const ramps = new Set(state.ramps.filter((r) => r.record_set === rs.key).map((r) => `ramp:${r.name}`));
  for (const e of page.operators) {
    if (e.at < start || !(e.target === rs.key || e.target === "shifting" || ramps.has(e.target))) continue;
    parts.push(s("text", { class: "operator-mark", x: x(e.at), y: H - 20, "text-anchor": "middle" }, "◆",
      s("title", {}, `${clock(e.at)} ${e.action} ${e.target} by ${e.who}: ${e.reason}`)));
  }
  // The verdict strips: one per region, its symbol where it changed (colour is never alone).
  const strips = [];
  regions.forEach((region, i) => {
    const y0 = H + 4 + i * (stripH + 3);
    strips.push(s("text", { x: left - 4, y: y0 + 11, "text-anchor": "end" }, region));
    const history = page.history.filter((e) => e.region === region);
    const before = history.filter((e) => e.at <= start).pop();
    const current = state.regions.find((r) => r.name === region)?.verdict?.status || "unknown";
    let status = before ? before.to : history.length ? history[0].from || "unknown" : current;
    let from = start;
    const segment = (t0, t1, st) => {
      strips.push(s("rect", { x: x(t0), y: y0, width: Math.max(1, x(t1) - x(t0)), height: stripH, fill: stripColour(st) },
        s("title", {}, `${region} ${st} from ${clock(t0)}`)));
    };
    const symbols = [];
    for (const e of history) {
      if (e.at <= start) continue;
      segment(from, e.at, status);
      symbols.push(s("text", { x: x(e.at) + 1, y: y0 + 11, fill: "#fff" }, SYMBOLS[e.to] || "?"));
      from = e.at;
      status = e.to;
    }
    segment(from, end, status);
    strips.push(...symbols, s("text", { x: W - right + 6, y: y0 + 11 }, `${SYMBOLS[status] || "?"} ${status}`));
  });
  const height = H + 8 + regions.length * (stripH + 3);
  return s("svg", { class: "chart", viewBox: `0 0 ${W} ${height}`, role: "img",
    "aria-label": `share of ${rs.key} by region and each region's verdict, last ${age(span)}` },
  s("title", {}, `Share of ${rs.key} by region, and each region's verdict, over the last ${age(span)}`), parts, strips);
}

function stripColour(status) {
  return { healthy: "#2da44e", degraded: "#bf8700", unhealthy: "#cf222e", unknown: "#8c959f" }[status] || "#8c959f";
}

function renderRamps(state) {
  draw("ramps", [state.ramps, state.actions], () => rampTable(state));
}

function rampTable(state) {
  if (!state.ramps.length) return h("p", { class: "muted" }, "No ramps configured.");
  const head = h("tr", {}, ["Ramp", "Status", "Wave", "Step", "Share", "Bake left", "Gates", "Why", ""].map((t) => h("th", {}, t)));
  const rows = state.ramps.map((r) => {
    const g = r.gates || {};
    const gates = `start gate ${duration(g.start_gate)}, bake ${duration(g.bake)} a step, ${duration(g.wave_bake)} a wave; on failure ${g.on_failure}`;
    return h("tr", { "data-ramp": r.name },
      h("th", { scope: "row" }, r.name, h("br"), h("span", { class: "muted" }, r.record_set)),
      h("td", { class: "ramp-status" }, h("span", { class: `status r-${r.status}` }, rampSymbol(r.status), " ", r.status.replace("_", " "))),
      h("td", {}, `${r.wave}/${r.waves} `, h("span", { class: "muted" }, (r.targets || []).join(", "))),
      h("td", { class: "ramp-step" }, `${Math.max(r.step, 0)}/${r.steps}`),
      h("td", { class: "ramp-share" }, `${r.share}%`),
      h("td", {}, r.status === "baking" && r.bake_until ? countdown(r.bake_until) : "-"),
      h("td", { class: "muted" }, gates),
      h("td", { class: "ramp-reason" }, h("div", { class: "clamp", title: r.reason }, r.reason, r.pending ? " (a write is in flight)" : "")),
      h("td", {}, actionable(state) ? rampButtons(r) : null));
  });
  return h("table", { id: "ramp-table" }, h("thead", {}, head), h("tbody", {}, rows));
}

function rampSymbol(status) {
  // Glyphs every system font has (an emoji font is not a given on a server's browser).
  return { pending: "○", running: "▶", baking: "◐", paused: "‖", done: "✓", rolled_back: "↩", aborted: "■" }[status] || "?";
}

function rampButtons(r) {
  const allowed = {
    start: ["pending", "rolled_back", "aborted"].includes(r.status),
    pause: ["running", "baking"].includes(r.status),
    resume: r.status === "paused",
    abort: ["running", "baking", "paused"].includes(r.status),
  };
  return h("div", { class: "actions" }, Object.entries(allowed).filter(([, ok]) => ok).map(([action]) =>
    h("button", { "data-action": action, class: action === "abort" ? "danger" : null, onclick: () => act(action, r.name) },
      action[0].toUpperCase() + action.slice(1))));
}

function renderAudit() {
  if (page.state) draw("audit", [page.audit, page.operators], auditTable);
}

function auditTable() {
  if (!page.audit.length && !page.operators.length) return h("p", { class: "muted" }, "No changes in the last hour.");
  const head = h("tr", {}, ["When", "Record", "Action", "Who", "Why", "Before → after", "Outcome", "INSYNC"].map((t) => h("th", {}, t)));
  const weights = (from, to) => {
    const names = [...new Set([...Object.keys(from || {}), ...Object.keys(to || {})])];
    return names.map((n) => `${n} ${from?.[n] ?? "-"}→${to?.[n] ?? "-"}`).join(", ");
  };
  const operatorRows = page.operators.map((o) => [o.at, h("tr", { class: "operator-row" },
    h("td", {}, clock(o.at).slice(11), h("br"), h("span", { class: "muted" }, ageOf(o.at), " ago")),
    h("td", {}, o.target), h("td", {}, `◆ ${o.action}`), h("td", {}, o.who),
    h("td", {}, h("div", { class: "clamp", title: o.reason }, o.reason)), h("td", {}, "-"), h("td", {}, "done"), h("td", {}, "-"))]);
  const changeRows = page.audit.map((c) => [c.at, h("tr", {},
    h("td", {}, clock(c.at).slice(11), h("br"), h("span", { class: "muted" }, ageOf(c.at), " ago")),
    h("td", {}, c.record), h("td", {}, c.action), h("td", {}, c.actor),
    h("td", {}, h("div", { class: "clamp", title: c.reason }, c.reason)), h("td", {}, h("code", {}, weights(c.from, c.to))),
    h("td", {}, c.outcome || "in flight", c.error ? h("div", { class: "muted" }, c.error) : null),
    h("td", {}, c.insync_at ? `${clock(c.insync_at).slice(11)} (+${(c.insync_at - c.at).toFixed(1)}s)` : "-"))]);
  const rows = [...changeRows, ...operatorRows].sort((a, b) => b[0] - a[0]).map(([, row]) => row);
  return h("table", { id: "audit-table" }, h("thead", {}, head), h("tbody", {}, rows));
}

// --- acting ------------------------------------------------------------------------------------

const CONFIRM = { abort: true, freeze: true, adopt: true }; // these ask for a typed confirmation

function forget() {
  sessionStorage.removeItem("regionshift.token");
  sessionStorage.removeItem("regionshift.operator");
}

function credentials() {
  const token = sessionStorage.getItem("regionshift.token");
  const operator = sessionStorage.getItem("regionshift.operator");
  if (token && operator) return Promise.resolve({ token, operator });
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  form.reset();
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(null);
      const given = { token: form.token.value.trim(), operator: form.operator.value.trim() };
      if (!given.token || !given.operator) return resolve(null);
      sessionStorage.setItem("regionshift.token", given.token);
      sessionStorage.setItem("regionshift.operator", given.operator);
      resolve(given);
    }, { once: true });
    dialog.showModal();
  });
}

function confirmTyped(title, text, word) {
  const dialog = document.getElementById("confirm-dialog");
  const form = document.getElementById("confirm-form");
  form.reset();
  dialog.returnValue = "";
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-word").textContent = word;
  const ok = document.getElementById("confirm-ok");
  ok.disabled = true;
  form.typed.oninput = () => { ok.disabled = form.typed.value.trim() !== word; };
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" && form.typed.value.trim() === word ? form.reason.value.trim() || null : false);
    }, { once: true });
    dialog.showModal();
  });
}

async function act(action, target) {
  let request, reason = null;
  if (CONFIRM[action]) {
    const what = {
      abort: [`Abort ramp ${target}?`, "The ramp stops and its share goes back to the weights before its wave.", target],
      freeze: ["Freeze every weight change?", "regionshift stops changing Route 53 (ramps and evacuations hold) until unfrozen.", "FREEZE"],
      adopt: [`Adopt Route 53's weights for ${target}?`, "The hand edit becomes the new baseline; nothing is sent to Route 53.", target],
    }[action];
    reason = await confirmTyped(...what);
    if (reason === false) return notice(`${action} cancelled.`);
  }
  const who = await credentials();
  if (!who) return notice(`${action}: cancelled, no token given.`);
  if (action === "freeze" || action === "unfreeze") {
    const body = { frozen: action === "freeze" };
    if (reason) body.reason = reason;
    request = ["/api/v1/freeze", body];
  } else if (action === "adopt") {
    request = [`/api/v1/records/${encodeURI(target)}/adopt`, reason ? { reason } : {}];
  } else {
    request = [`/api/v1/ramps/${encodeURIComponent(target)}/${action}`, null];
  }
  const [path, body] = request;
  try {
    const response = await fetch(path, {
      method: "POST",
      cache: "no-store",
      headers: { Authorization: `Bearer ${who.token}`, "X-Regionshift-Operator": who.operator, "Content-Type": "application/json" },
      body: body === null ? "" : JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status === 401 || (response.status === 400 && /Operator/.test(answer.error || ""))) {
      forget(); // asked again at the next action
      return notice(`${action} refused: ${answer.error || "wrong token"}. Sign in again.`, true);
    }
    if (!response.ok) return notice(`${action} refused (${response.status}): ${answer.error || response.statusText}`, true);
    notice(`${action}${target ? ` ${target}` : ""}: done by ${who.operator}.`);
  } catch (error) {
    return notice(`${action} failed: the request did not reach the daemon (${error.message}).`, true);
  }
  refreshSoon(0);
  loadAudit();
}

// --- start ---------------------------------------------------------------------------------------

setInterval(tick, 1000);
follow();
refreshSoon(REFRESH * 1000);
