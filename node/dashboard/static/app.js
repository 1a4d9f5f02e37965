// Polls /api/state once a second and redraws the page. Every string that comes from the swarm
// (peer ids, devices, ban reasons) is written with textContent, never parsed as HTML: an advert is
// written by a peer that may be hostile.
"use strict";

const POLL_MS = 1000;

function human(n) {
  if (n === null || n === undefined) return "–";
  const units = ["", "k", "M", "G", "T", "P"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return (i === 0 && Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + units[i];
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
}

function fixed(n, digits) {
  return n === null || n === undefined ? "–" : Number(n).toFixed(digits);
}

function setCards(cards) {
  const box = document.getElementById("summary");
  for (const [key, label, value] of cards) {
    let card = box.querySelector(`[data-key="${key}"]`);
    if (card === null) {
      card = document.createElement("div");
      card.className = "card";
      const l = document.createElement("span");
      l.className = "label";
      l.textContent = label;
      const v = document.createElement("span");
      v.className = "value";
      v.dataset.key = key;
      card.append(l, v);
      box.append(card);
      card = v;
    }
    card.textContent = value;
  }
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (typeof cell === "object" && cell !== null) {
        td.textContent = cell.text;
        td.className = cell.cls;
      } else {
        td.textContent = cell;
      }
      tr.append(td);
    }
    return tr;
  }));
}

function drawLoss(steps) {
  const canvas = document.getElementById("loss-chart");
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800;
  const height = canvas.clientHeight || 260;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const pad = { left: 52, right: 16, top: 14, bottom: 28 };
  const values = steps.flatMap((s) => (s.eval_loss === null ? [s.loss] : [s.loss, s.eval_loss]));
  ctx.strokeStyle = "#9aa3b5";
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  ctx.fillStyle = "#5a6478";
  ctx.font = "12px sans-serif";
  if (values.length === 0) {
    ctx.fillText("waiting for the first optimizer step", pad.left + 12, pad.top + 22);
    return;
  }
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const last = Math.max(steps[steps.length - 1].step, 2);
  const x = (step) => pad.left + ((step - 1) / (last - 1)) * (width - pad.left - pad.right);
  const y = (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  ctx.fillText(hi.toFixed(3), 4, pad.top + 10);
  ctx.fillText(lo.toFixed(3), 4, height - pad.bottom);
  ctx.fillText("step " + last, width - pad.right - 50, height - 8);
  ctx.strokeStyle = "#2864c8";
  ctx.lineWidth = 2;
  ctx.beginPath();
  steps.forEach((s, i) => (i === 0 ? ctx.moveTo(x(s.step), y(s.loss)) : ctx.lineTo(x(s.step), y(s.loss))));
  ctx.stroke();
  ctx.fillStyle = "#2864c8";
  for (const s of steps) ctx.fillRect(x(s.step) - 2, y(s.loss) - 2, 4, 4);
  ctx.fillStyle = "#e07a1f";
  for (const s of steps.filter((p) => p.eval_loss !== null)) {
    ctx.beginPath();
    ctx.arc(x(s.step), y(s.eval_loss), 4, 0, 2 * Math.PI);
    ctx.fill();
  }
}

function renderClient(state) {
  const t = state.traffic;
  const steps = state.training.steps;
  const last = steps.length ? steps[steps.length - 1] : null;
  const total = state.training.total_steps;
  setCards([
    ["step", "step", `${steps.length ? last.step : 0}${total ? " / " + total : ""}`],
    ["loss", "training loss", last ? fixed(last.loss, 4) : "–"],
    ["tokens_per_s", "tokens/s", last ? fixed(last.tokens_per_s, 1) : "–"],
    ["bytes_sent", "sent", bytes(t.bytes_sent)],
    ["bytes_received", "received", bytes(t.bytes_received)],
    ["chunks", "chunks verified", String(t.chunks)],
    ["macs", "MACs", human(t.macs)],
    ["paid", "paid", String(t.paid)],
    ["retries", "retries", String(t.retries)],
    ["verification_failures", "verification failures", String(t.verification_failures)],
    ["bans", "bans", String(Object.keys(state.bans).length)],
  ]);
  document.getElementById("training").hidden = false;
  drawLoss(steps);
  document.getElementById("peers-section").hidden = false;
  fillTable("peers", state.peers.map((p) => [
    p.peer, p.relayed ? "relayed" : "direct", p.device, p.layers === null ? "all" : String(p.layers), human(p.macs_per_second),
    human(p.measured_macs_per_second), p.latency_s === null ? "–" : `${Math.round(p.latency_s * 1000)} ms`,
    String(p.price_per_gmac), String(p.free_slots), fixed(p.reputation, 2), String(p.chunks), String(p.failures),
    String(state.spend[p.peer] || 0), p.banned ? { text: p.banned, cls: "banned" } : "ok",
  ]));
}

function renderProvider(state) {
  const p = state.provider;
  const rejected = Object.entries(p.rejected);
  setCards([
    ["served", "chunks served", String(p.served)],
    ["macs", "MACs", human(p.macs)],
    ["earned", "earned", String(p.earned)],
    ["rejected", "rejected", String(rejected.reduce((sum, [, n]) => sum + n, 0))],
    ["requests", "requests", String(p.requests)],
    ["in_flight", "in flight", String(p.in_flight)],
    ["acks", "receipts countersigned", String(p.acks)],
    ["price_per_gmac", "price/GMAC", String(p.price_per_gmac)],
    ["macs_per_second", "MAC/s", human(p.macs_per_second)],
    ["layers", "layers held", `${p.layers_held} / ${p.layers_total}`],
  ]);
  document.getElementById("rejected-section").hidden = false;
  fillTable("rejected", rejected.map(([reason, n]) => [reason, String(n)]));
  document.getElementById("connected-section").hidden = false;
  document.getElementById("connected").replaceChildren(...state.connected.map((peer) => {
    const li = document.createElement("li");
    li.textContent = peer;
    return li;
  }));
}

function render(state) {
  document.getElementById("role").textContent = state.role;
  document.getElementById("uptime").textContent = `up ${Math.round(state.uptime_s)} s`;
  if (state.role === "client") renderClient(state);
  else renderProvider(state);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    status.textContent = "live";
    status.className = "badge live";
  } catch (err) {
    status.textContent = "offline";
    status.className = "badge offline";
  }
  setTimeout(poll, POLL_MS);
}

poll();
