// The catalog gateway's dashboard: polls the GraphQL API every 500 ms for
// breaker states and live numbers, streams breaker transitions over the
// GraphQL WebSocket (graphql-transport-ws), and drives the admin
// mutations. No build step, no dependency.
"use strict";

const SERVICES = ["command", "query"];
const POLL_MS = 500;
const HISTORY = 120; // samples of calls/s kept for the sparkline (a minute)
const cards = {};
const history = { command: [], query: [] };
let faults = {};
let polling = false;
let wsLive = false;

async function gql(query, variables) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 4000);
  try {
    const response = await fetch("/graphql", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ query, variables: variables || null }),
      signal: abort.signal,
    });
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

function say(text) {
  document.getElementById("message").textContent = text || "";
}

function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(1) + " ms";
}

function makeCard(name) {
  const node = document.getElementById("card").content.firstElementChild.cloneNode(true);
  node.id = "card-" + name;
  node.querySelector(".name").textContent = name;
  const el = (cls) => node.querySelector("." + cls);
  el("state").id = "state-" + name;
  el("outage").id = "outage-" + name;
  el("apply").id = "apply-" + name;
  el("clear").id = "clear-" + name;
  el("reset").id = "reset-" + name;
  el("health-now").id = "health-" + name;
  el("endpoint-list").id = "endpoints-" + name;
  el("outage").addEventListener("click", () => toggleOutage(name));
  el("apply").addEventListener("click", () => inject(name));
  el("clear").addEventListener("click", () => setFaults(name, {}));
  el("reset").addEventListener("click", () => reset(name));
  document.getElementById("services").appendChild(node);
  return { node, el };
}

function service(name) {
  return name.toUpperCase();
}

async function setFaults(name, input) {
  const r = await gql(
    "mutation($s: Service!, $f: FaultInput!) { setFaults(service: $s, faults: $f) { outage } }",
    { s: service(name), f: input }
  );
  say(r.errors ? r.errors[0].message : "faults of " + name + " set");
  poll();
}

function toggleOutage(name) {
  const now = faults[name] && faults[name].outage;
  setFaults(name, { outage: !now });
}

function inject(name) {
  const { el } = cards[name];
  const rate = Number(el("error-rate").value) / 100;
  const lost = Number(el("lost-rate").value) / 100;
  const latency = Math.max(0, Math.round(Number(el("latency").value)));
  const errors = rate > 0 ? [{ code: el("error-code").value, rate }] : [];
  setFaults(name, { errors, lostResponseRate: lost, latencyMs: latency });
}

async function reset(name) {
  const r = name
    ? await gql("mutation($n: String!) { resetCircuitBreaker(name: $n) { state } }", { n: name })
    : await gql("mutation { resetCircuitBreakers { name state } }");
  say(r.errors ? r.errors[0].message : (name ? "breaker " + name : "all breakers") + " reset");
  poll();
}

function describeFaults(f) {
  if (!f) return "faults: not controllable (external service)";
  if (f.outage) return "faults: OUTAGE (every call UNAVAILABLE)";
  const parts = f.errors.map((e) => Math.round(e.rate * 100) + "% " + e.code);
  if (f.lostResponseRate > 0) parts.push(Math.round(f.lostResponseRate * 100) + "% lost responses");
  if (f.latencyMs > 0) parts.push("+" + f.latencyMs + " ms");
  return "faults: " + (parts.length ? parts.join(", ") : "none");
}

function drawSpark(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...values.map((v) => v.rate));
  const step = w / (HISTORY - 1);
  const x0 = w - (values.length - 1) * step;
  values.forEach((v, i) => {
    const x = x0 + i * step;
    const bar = (v.rate / max) * (h - 4);
    ctx.fillStyle = v.success < 0.5 ? "#e5484d" : v.success < 0.9 ? "#f2b134" : "#2fbf71";
    ctx.fillRect(x - step / 2, h - bar, Math.max(1, step - 1), bar);
  });
}

function render(data) {
  document.getElementById("stack").textContent = data.stack + " channels";
  faults = {};
  (data.faults || []).forEach((f) => { faults[f.service.toLowerCase()] = f; });
  const breakers = {};
  (data.circuitBreakers || []).forEach((b) => { breakers[b.name] = b; });
  const health = {};
  (data.serviceHealth || []).forEach((h) => { health[h.service.toLowerCase()] = h.status; });
  (data.services || []).forEach((s) => {
    const name = s.service.toLowerCase();
    const { node, el } = cards[name];
    const b = breakers[name];
    const state = b ? b.state : "NONE";
    const stateEl = el("state");
    stateEl.textContent = b ? state : "no breaker";
    stateEl.className = "state " + state;
    node.className = "card " + state.toLowerCase();
    el("rate").textContent = s.callsPerSecond.toFixed(1);
    el("success").textContent = (s.successRate * 100).toFixed(1) + "%";
    el("retries").textContent = s.retries;
    el("rejected").textContent = s.rejected;
    el("p50").textContent = s.callsPerSecond > 0 ? fmtMs(s.p50Ms) : "–";
    el("p99").textContent = s.callsPerSecond > 0 ? fmtMs(s.p99Ms) : "–";
    el("failures").textContent = b ? b.failureCount : "–";
    el("probe").textContent = b && b.nextProbeIn !== null ? fmtMs(b.nextProbeIn) : "–";
    // Hystrix's circle: size is traffic, colour is health.
    const circle = node.querySelector(".health circle");
    circle.setAttribute("r", String(12 + Math.min(36, Math.sqrt(s.callsPerSecond) * 5)));
    circle.style.fill = state === "OPEN" || state === "FORCED_OPEN" || s.successRate < 0.5
      ? "#e5484d" : state === "HALF_OPEN" || s.successRate < 0.9 ? "#f2b134" : "#2fbf71";
    const f = faults[name];
    el("fault-now").textContent = describeFaults(f);
    const outage = el("outage");
    outage.textContent = f && f.outage ? "Outage off" : "Outage on";
    outage.classList.toggle("on", Boolean(f && f.outage));
    outage.disabled = !f;
    const h = health[name];
    const healthEl = el("health-now");
    healthEl.textContent = "health: " + (h || "not known (external service)");
    healthEl.className = "health-now " + (h || "UNKNOWN");
    renderEndpoints(el("endpoint-list"), name, data.endpoints || []);
    history[name].push({ rate: s.callsPerSecond, success: s.successRate });
    if (history[name].length > HISTORY) history[name].shift();
    drawSpark(el("spark"), history[name]);
  });
  if (!wsLive && data.breakerTransitions) {
    const list = document.getElementById("transitions");
    list.innerHTML = "";
    data.breakerTransitions.forEach(addTransition);
  }
}

// The endpoints of a balanced channel (`query@127.0.0.1:50052`): each with
// its standing, its breaker and its ejections so far.
function renderEndpoints(list, name, endpoints) {
  const mine = endpoints.filter((e) => e.name.startsWith(name + "@"));
  list.innerHTML = "";
  mine.forEach((e) => {
    const li = document.createElement("li");
    li.className = e.ejected ? "ejected" : e.status === "probing" ? "probing" : "active";
    li.textContent = e.address + ": " + e.status + " · breaker " + (e.breakerState || "–") +
      " · " + e.ejections + " ejection" + (e.ejections === 1 ? "" : "s") +
      (e.notServing ? " · NOT_SERVING" : "");
    list.appendChild(li);
  });
}

function addTransition(t) {
  const list = document.getElementById("transitions");
  const li = document.createElement("li");
  li.textContent = t.at + "  " + t.name + ": " + t.from + " → " + t.to + "  (" + t.trigger + ")";
  list.insertBefore(li, list.firstChild);
  while (list.children.length > 200) list.removeChild(list.lastChild);
}

const STATUS = `{
  stack
  circuitBreakers { name state failureCount nextProbeIn }
  services { service callsPerSecond successRate retries rejected p50Ms p99Ms }
  faults { service outage errors { code rate } lostResponseRate latencyMs }
  serviceHealth { service status }
  endpoints { name address status ejected breakerState ejections notServing }
}`;
const STATUS_WITH_LOG = STATUS.replace(/}$/, " breakerTransitions { name from to trigger at } }");

async function poll() {
  if (polling) return;
  polling = true;
  const connection = document.getElementById("connection");
  try {
    const r = await gql(wsLive ? STATUS : STATUS_WITH_LOG);
    if (r.data) render(r.data);
    connection.textContent = wsLive ? "live (subscription)" : "live (polling)";
    connection.className = "tag live";
  } catch (e) {
    connection.textContent = "gateway unreachable";
    connection.className = "tag down";
  } finally {
    polling = false;
  }
}

function subscribe() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/graphql/ws";
  let ws;
  try {
    ws = new WebSocket(url, "graphql-transport-ws");
  } catch (e) {
    return;
  }
  ws.onopen = () => ws.send(JSON.stringify({ type: "connection_init" }));
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "connection_ack") {
      ws.send(JSON.stringify({
        id: "transitions",
        type: "subscribe",
        payload: { query: "subscription { breakerTransitions { name from to trigger at } }" },
      }));
      // Keep what polling has shown so far; new transitions come from here.
      wsLive = true;
      document.getElementById("log-source").textContent = "(streamed over the GraphQL subscription)";
    } else if (msg.type === "next" && msg.payload && msg.payload.data) {
      addTransition(msg.payload.data.breakerTransitions);
      poll();
    } else if (msg.type === "ping") {
      ws.send(JSON.stringify({ type: "pong" }));
    }
  };
  ws.onclose = () => {
    wsLive = false;
    document.getElementById("log-source").textContent = "(polled)";
    setTimeout(subscribe, 3000);
  };
}

// Test traffic from the page itself: bounded to 20 calls in flight.
let trafficTimer = null;
let inFlight = 0;
function startTraffic(rate) {
  if (trafficTimer) clearInterval(trafficTimer);
  trafficTimer = null;
  if (rate <= 0) return;
  trafficTimer = setInterval(() => {
    if (inFlight >= 20) return;
    inFlight++;
    const pick = Math.random();
    const call = pick < 0.8
      ? gql("query($id: String!) { product(id: $id) { id } }", { id: "p" + (1 + Math.floor(Math.random() * 20)) })
      : pick < 0.9
        ? gql("{ products(first: 5) { nodes { id } } }")
        : gql("mutation { createProduct(input: { name: \"from the dashboard\", priceCents: 100 }) { id } }");
    call.catch(() => {}).finally(() => { inFlight--; });
  }, 1000 / rate);
}

SERVICES.forEach((name) => { cards[name] = makeCard(name); });
document.getElementById("reset-all").addEventListener("click", () => reset(null));
document.getElementById("traffic").addEventListener("change", (e) => startTraffic(Number(e.target.value)));
poll();
setInterval(poll, POLL_MS);
subscribe();
