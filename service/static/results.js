// Drawing one answer of POST /v1/classify, and the compare table of every expert on one input.

import {
  $, colourClass, el, fillBars, fillStack, formatInt, formatMs, formatPercent, humanize, setWidth,
} from "./dom.js";

const TOP_SCORES = 5; // the rest fold into "All class scores": a glance, not a 101-row list

// Why a path ran, in words: decided_by is a code.
const WHY = {
  router: "The router's highest score picked this path.",
  threshold: "The router's pick scored below the threshold, so the request escalated to the full path.",
  request: "The request forced this path (route).",
  missing_modality: "A modality was missing: this is the path that runs without it.",
  confidence: "The cheaper expert was not confident enough (min_confidence), so the full path ran too.",
};

const MODALITY_COLOURS = ["m0", "m1", "m2", "m3"];

// How the importance was computed, in words: importance_method is a code.
const METHOD = {
  one_modality: "This expert reads one modality: it gets 100%.",
  exact: "Computed exactly: the expert's fusion part ran again without each modality.",
  head: "Estimated by a small head distilled from exact values; tick Explain for the exact ones.",
  mixture: "Soft fusion: each expert's shares, weighted by its part in the label's probability.",
  unavailable: "This model was exported before attribution: these are the routers' modality weights.",
};

const signed = (value) => `${value >= 0 ? "+" : "\u2212"}${Math.abs(value).toFixed(3)}`;

// A two-part bar and its legend: #out-<id> and #<id>-legend, each figure in #out-<prefix>-<modality>.
// shapley: the raw values, shown beside the shares (the exact explanation).
function drawSplit(id, values, title, prefix = id, shapley = null) {
  const modalities = Object.entries(values);
  const describe = modalities.map(([name, value]) => `${name} ${formatPercent(value)}`).join(", ");
  const colour = (i) => MODALITY_COLOURS[i % MODALITY_COLOURS.length];
  fillStack($(`out-${id}`), modalities.map(([name, value], i) => ({ name, value, colour: colour(i) })),
    `${title}: ${describe}`);
  $(`${id}-legend`).replaceChildren(
    ...modalities.map(([name, value], i) =>
      el("li", {},
        el("span", { class: `key ${colour(i)}` }),
        `${humanize(name)} `,
        el("strong", { id: `out-${prefix}-${name}`, dataset: { value }, text: formatPercent(value) }),
        shapley ? el("span", { id: `out-shapley-${name}`, class: "muted", dataset: { value: shapley[name] },
          text: ` (\u03c6 ${signed(shapley[name])})` }) : null),
    ),
  );
}

// One expert's importance in a table cell: "text 62% · image 38%".
function importanceText(importance) {
  return Object.entries(importance).map(([name, value]) => `${name} ${formatPercent(value)}`).join(" \u00b7 ");
}

export function topScore(scores) {
  return Math.max(...Object.values(scores));
}

export function renderResult(model, body, { roundTripMs, expected }) {
  const experts = model.experts.map((e) => e.name);
  const ranked = Object.entries(body.scores).sort((a, b) => b[1] - a[1]);
  const bar = ([name, value]) => ({ name, value, chosen: name === body.label, colour: "c-label" });

  $("out-label").textContent = body.label;
  $("out-confidence").textContent = formatPercent(topScore(body.scores));
  $("out-expected").hidden = !expected;
  if (expected) {
    const right = expected === body.label;
    const verdict = right ? "\u2713 matches" : "\u2717 differs from";
    $("out-expected").textContent = `${verdict} the example's label, ${expected}`;
    $("out-expected").className = right ? "ok-text" : "error-text";
  }
  fillBars($("out-scores"), ranked.slice(0, TOP_SCORES).map(bar));
  $("more-scores").hidden = ranked.length <= TOP_SCORES;
  fillBars($("out-all-scores"), ranked.map(bar));

  const route = body.route;
  $("out-expert").textContent = route.expert;
  $("out-expert").className = `chip ${colourClass(experts, route.expert)}`;
  $("out-decided-by").textContent = route.decided_by;
  $("out-route-why").textContent = WHY[route.decided_by] || "";
  $("out-operating-point").hidden = !route.operating_point;
  $("out-operating-point").textContent = route.operating_point ? `Operating point: ${route.operating_point}` : "";
  const expertBars = (values) =>
    Object.entries(values).map(([name, value]) => ({
      name,
      value,
      chosen: name === route.expert,
      colour: colourClass(experts, name),
      note: name === model.full_expert ? "(full)" : "",
    }));
  fillBars($("out-route-scores"), expertBars(route.scores || {}));
  $("weights-block").hidden = !route.weights;
  fillBars($("out-route-weights"), route.weights ? expertBars(route.weights) : []);

  drawSplit("importance", body.importance, "What decided the answer");
  $("out-importance-method").textContent = METHOD[body.importance_method] || "";
  drawSplit("modality-weights", route.modality_weights || {}, "Modality weights of the routers", "weight");
  const explanation = body.explanation;
  $("explanation-block").hidden = !explanation;
  if (explanation) {
    drawSplit("exact", explanation.importance, "Exact shares", "exact", explanation.shapley);
    const lp = explanation.log_prob;
    $("out-log-probs").textContent =
      `log p = ${signed(lp.both)} (both), ${signed(lp.text_only)} (text only), ` +
      `${signed(lp.image_only)} (image only), ${signed(lp.neither)} (neither).`;
  }

  const { madds, madds_full: full, saved_ratio: saved } = body.compute;
  const scale = Math.max(madds, full);
  $("out-saved").textContent = formatPercent(saved);
  $("out-saved").dataset.value = saved;
  $("out-saved").title = saved < 0 ? "Negative on the full path: the router's own cost, reported as it is." : "";
  $("out-madds").textContent = formatInt(madds);
  $("out-madds").dataset.value = madds;
  $("out-madds-full").textContent = formatInt(full);
  setWidth($("out-madds-bar"), madds / scale);
  setWidth($("out-madds-full-bar"), full / scale);

  $("out-time-queue").textContent = formatMs(body.timing_ms.queue);
  $("out-time-inference").textContent = formatMs(body.timing_ms.inference);
  $("out-time-total").textContent = formatMs(body.timing_ms.total);
  $("out-time-browser").textContent = formatMs(roundTripMs);

  $("result-empty").hidden = true;
  $("result-cards").hidden = false;
  return `${body.label}, ${formatPercent(topScore(body.scores))}: the ${route.expert} path, decided by ` +
    `${route.decided_by}, saved ${formatPercent(saved)} of the full path's compute.`;
}

// runs: [{expert, body} | {expert, error}] in the model's expert order; auto: the router's own answer.
export function renderCompare(model, auto, runs) {
  const experts = model.experts.map((e) => e.name);
  const full = runs.find((run) => run.expert === model.full_expert && run.body);
  const chosen = auto.body?.route.expert;
  $("compare-rows").replaceChildren(...runs.map((run) => compareRow(model, experts, run, chosen, full)));

  const summary = $("compare-summary");
  if (auto.error) {
    summary.textContent = `The router's own choice could not be run: ${auto.error.message}`;
  } else {
    const agrees = full ? auto.body.label === full.body.label : null;
    summary.textContent =
      `The router chose ${chosen} (decided by ${auto.body.route.decided_by}) and answered ${auto.body.label}` +
      (agrees === null ? "." : agrees ? ", the full path's label too," : `; the full path says ${full.body.label},`) +
      ` at ${formatPercent(auto.body.compute.madds / auto.body.compute.madds_full)} of the full path's compute.`;
  }
  $("compare").hidden = false;
}

function compareRow(model, experts, run, chosen, full) {
  const badges = [
    run.expert === chosen ? el("span", { class: "badge chosen-badge", text: "router's choice" }) : null,
    run.expert === model.full_expert ? el("span", { class: "badge", text: "full path" }) : null,
  ];
  const chip = el("span", { class: `chip ${colourClass(experts, run.expert)}`, text: run.expert });
  const name = el("th", { scope: "row" }, chip, ...badges);
  const isChosen = run.expert === chosen;
  const attributes = { class: isChosen ? "is-chosen" : "", dataset: { expert: run.expert, chosen: String(isChosen) } };
  if (run.error) {
    const message = `${run.error.status || ""} ${run.error.message}`.trim();
    return el("tr", attributes, name, el("td", { colspan: 6, class: "error-text", text: message }));
  }
  const body = run.body;
  const same = full ? (body.label === full.body.label ? "\u2713 yes" : "\u2717 no") : "\u2013";
  // data-label: the column's name, shown beside each figure where the table folds into blocks (phones).
  return el("tr", attributes, name,
    el("td", { "data-label": "label", text: body.label }),
    el("td", { "data-label": "confidence", class: "num", text: formatPercent(topScore(body.scores)) }),
    el("td", { "data-label": "MAdds", class: "num", text: formatInt(body.compute.madds) }),
    el("td", { "data-label": "saved", class: "num", text: formatPercent(body.compute.saved_ratio) }),
    el("td", { "data-label": "same label as full", text: same }),
    el("td", { "data-label": "what decided it", class: "importance-cell", text: importanceText(body.importance),
      dataset: { text: body.importance.text, image: body.importance.image, method: body.importance_method } }),
  );
}
