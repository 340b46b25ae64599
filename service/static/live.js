// The live panel: route mix and compute saved over the last minutes, from the server's own
// Prometheus counters (GET /metrics) read every few seconds, for users without a Grafana.
// Counters only grow, so a window's figures are the differences between two readings.

import { apiUrl } from "./api.js";
import { $, colourClass, el, fillStack, formatInt, formatPercent, humanize } from "./dom.js";

const POLL_MS = 5000;
const WINDOW_MS = 5 * 60 * 1000;

// Prometheus text format, the samples we need: name{labels} value.
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = SAMPLE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, name, value] of (match[2] || "").matchAll(LABEL)) {
      labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// One reading for one model: decisions per expert and per decided_by, and the two compute counters.
export function reading(samples, model) {
  const out = { experts: {}, decidedBy: {}, madds: 0, full: 0 };
  for (const { name, labels, value } of samples) {
    if (labels.model !== model) continue;
    if (name === "dynfuse_route_decisions_total") {
      out.experts[labels.expert] = (out.experts[labels.expert] || 0) + value;
      out.decidedBy[labels.decided_by] = (out.decidedBy[labels.decided_by] || 0) + value;
    } else if (name === "dynfuse_compute_madds_total") out.madds += value;
    else if (name === "dynfuse_compute_full_madds_total") out.full += value;
  }
  return out;
}

function difference(now, then) {
  const sub = (a, b) => Object.fromEntries(Object.entries(a).map(([k, v]) => [k, v - (b[k] || 0)]));
  return { experts: sub(now.experts, then.experts), decidedBy: sub(now.decidedBy, then.decidedBy),
    madds: now.madds - then.madds, full: now.full - then.full };
}

// A counter that went down means the server restarted: the old readings no longer compare.
function wentDown(now, then) {
  return now.full < then.full || Object.entries(then.experts).some(([k, v]) => (now.experts[k] || 0) < v);
}

export class LivePanel {
  constructor(model) {
    this.model = model; // GET /v1/models/{name}'s answer
    this.readings = []; // [{at, reading}], oldest first, pruned to the window
    this.timer = null;
    $("live-refresh").addEventListener("click", () => this.poll());
    // A hidden tab need not poll; it catches up when it is shown again.
    document.addEventListener("visibilitychange", () => (document.hidden ? this.stop() : this.start()));
  }

  start() {
    if (this.timer !== null) return;
    this.poll();
    this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    let now;
    try {
      const response = await fetch(apiUrl("/metrics"));
      if (!response.ok) throw new Error(`GET /metrics answered ${response.status}`);
      now = reading(parseMetrics(await response.text()), this.model.name);
    } catch (error) {
      $("live-status").textContent = `Counters unavailable: ${error.message}`;
      return;
    }
    const at = Date.now();
    if (this.readings.length && wentDown(now, this.readings.at(-1).reading)) this.readings = [];
    this.readings.push({ at, reading: now });
    // Keep the newest reading at least WINDOW_MS old as the window's start, drop the older ones.
    while (this.readings.length > 2 && this.readings[1].at <= at - WINDOW_MS) this.readings.shift();
    this.draw(this.readings[0], { at, reading: now });
  }

  draw(start, end) {
    const delta = difference(end.reading, start.reading);
    const requests = Object.values(delta.experts).reduce((a, b) => a + b, 0);
    const full = end.at - start.at >= WINDOW_MS;
    const span = full ? "over the last 5 minutes" : "since this page opened";
    $("live-window").textContent = `Route mix and compute saved ${span}, from the server's counters`;
    $("live-requests").textContent = formatInt(requests);
    $("live-requests").dataset.value = requests;
    const experts = this.model.experts.map((e) => e.name);
    const saved = delta.full > 0 ? 1 - delta.madds / delta.full : null;
    $("live-saved").textContent = saved === null ? "–" : formatPercent(saved);
    $("live-saved").dataset.value = saved === null ? "" : saved;

    const names = [...experts, ...Object.keys(delta.experts).filter((name) => !experts.includes(name))];
    const parts = names.map((name) => ({ name, value: delta.experts[name] || 0, colour: colourClass(experts, name) }));
    const describe = parts.map((p) => `${p.name} ${p.value}`).join(", ");
    fillStack($("live-mix"), parts, `Route mix: ${describe}`);
    $("live-legend").replaceChildren(
      ...parts.map((part) =>
        el("li", { dataset: { expert: part.name, count: part.value } },
          el("span", { class: `key ${part.colour}` }),
          `${humanize(part.name)} `,
          el("strong", { text: formatInt(part.value) }),
          requests > 0 ? el("span", { class: "muted", text: ` ${formatPercent(part.value / requests, 0)}` }) : null),
      ),
    );
    const decided = Object.entries(delta.decidedBy).filter(([, n]) => n > 0);
    $("live-decided").textContent = decided.length
      ? `Decided by: ${decided.map(([name, n]) => `${humanize(name)} ${formatInt(n)}`).join(" · ")}`
      : "";
    const time = new Date(end.at).toLocaleTimeString("en-GB");
    $("live-status").textContent = requests > 0
      ? `Updated ${time}; every ${POLL_MS / 1000} s from /metrics.`
      : `No requests in this window yet (updated ${time}).`;
    $("live-status").dataset.updated = end.at;
  }
}
