// The playground: reads the served model from the API, builds the form from what the model has
// (routes, operating points, examples), sends one input and draws the answer.

import { Api, ApiError } from "./api.js";
import { $, el, formatInt, formatPercent, humanize } from "./dom.js";
import { LivePanel } from "./live.js";
import { renderCompare, renderResult } from "./results.js";

const api = new Api();
const state = {
  models: [], // names, from GET /v1/models
  model: null, // GET /v1/models/{name}
  image: null, // a File: picked, dropped or an example's
  expected: null, // the true label when the input is an unedited example
  previewUrl: null,
  live: null,
};

const STATUS_TEXT = {
  400: "400 Bad Request", 401: "401 Unauthorized", 404: "404 Not Found", 413: "413 Payload Too Large",
  415: "415 Unsupported Media Type", 422: "422 Unprocessable Content", 500: "500 Internal Server Error",
  503: "503 Service Unavailable",
};

// -- the model ------------------------------------------------------------------------------------
async function loadModel(name) {
  try {
    if (!name) {
      state.models = (await api.json("/v1/models")).models.map((m) => m.name);
      name = state.models[0];
    }
    state.model = await api.json(`/v1/models/${encodeURIComponent(name)}`);
  } catch (error) {
    modelUnavailable(error);
    return;
  }
  $("banner").hidden = true;
  $("key-form").hidden = true;
  showModel(state.model);
  setButtons(true);
}

function modelUnavailable(error) {
  if (error.status === 401) {
    askForKey(error);
  } else if (error.status === 503 || error.status === 0) {
    showBanner(`The model is not ready: ${error.message}. Trying again in a few seconds…`);
    setTimeout(() => loadModel(), 3000);
  } else {
    showBanner(`Cannot read the model: ${error.status} ${error.message}`);
  }
}

function showModel(model) {
  $("model-info").replaceChildren(
    state.models.length > 1 ? modelPicker(model.name) : el("strong", { text: model.name }),
    ` v${model.version} · ${model.experts.length} experts · full path ${model.full_expert}, ` +
      `${formatInt(model.madds_full)} MAdds · ${model.backend}/${model.device}`,
  );

  // Routes and operating points are shown when the model lists them, else what every model has.
  const routes = model.routes || ["auto", ...model.experts.map((e) => e.name)];
  $("route-select").replaceChildren(
    ...routes.map((route) => el("option", { value: route, text: routeLabel(model, route) })),
  );
  const points = model.operating_points || [];
  $("op-field").hidden = points.length === 0;
  $("op-select").replaceChildren(
    ...points.map((point) =>
      el("option", {
        value: point.name, selected: Boolean(point.default), text: pointLabel(point), title: pointTitle(point),
      })),
  );
  updateRouterOptions();

  const examples = model.examples || [];
  $("examples-section").hidden = examples.length === 0;
  $("examples").replaceChildren(...examples.map(exampleButton));

  if (state.live === null) {
    state.live = new LivePanel(model);
    state.live.start();
  } else {
    state.live.model = model;
  }
}

function modelPicker(current) {
  const select = el("select", { id: "model-select", "aria-label": "Model" },
    ...state.models.map((name) => el("option", { value: name, selected: name === current, text: name })));
  select.addEventListener("change", () => loadModel(select.value));
  return select;
}

function routeLabel(model, route) {
  if (route === "auto") return "auto: the router decides";
  if (route === "soft") return "soft: every expert, weighted";
  const expert = model.experts.find((e) => e.name === route);
  if (!expert) return route;
  return `${route}: forced (${expert.modalities.join(" + ")}, ${formatInt(expert.path_madds)} MAdds)`;
}

// Short enough for the select's width beside the form (its title, the option's tooltip, says it in full).
function pointLabel(point) {
  const figures = [
    point.accuracy !== undefined ? `${formatPercent(point.accuracy)} right` : null,
    point.saved_ratio !== undefined ? `saves ${formatPercent(point.saved_ratio)}` : null,
  ].filter(Boolean);
  return figures.length ? `${point.name}: ${figures.join(", ")}` : point.name;
}

function pointTitle(point) {
  const figures = [
    point.accuracy !== undefined ? `accuracy ${formatPercent(point.accuracy)} on validation` : null,
    point.saved_ratio !== undefined ? `saves ${formatPercent(point.saved_ratio)} of the full path's MAdds` : null,
  ].filter(Boolean);
  return figures.length ? `${point.name}: ${figures.join(", ")}` : point.name;
}

// The threshold moves the router's own decision and an operating point picks the router: neither
// means anything when the request forces an expert.
const routerDecides = (route) => route === "auto" || route === "soft";

function updateRouterOptions() {
  const route = $("route-select").value;
  enable($("threshold-field"), $("threshold-input"), route === "auto");
  enable($("op-field"), $("op-select"), routerDecides(route));
}

function enable(field, control, applies) {
  control.disabled = !applies;
  field.classList.toggle("is-disabled", !applies);
}

// -- the API key ----------------------------------------------------------------------------------
function askForKey(error) {
  const form = $("key-form");
  const first = form.hidden;
  form.hidden = false;
  $("model-info").textContent = "Waiting for an API key…";
  $("key-reason").textContent = "This server asks for an API key (sent as Authorization: Bearer).";
  $("key-error").hidden = first && !api.key;
  $("key-error").textContent = `${error.status} ${error.message}`;
  if (first) $("key-input").focus();
}

async function useKey(event) {
  event.preventDefault();
  api.key = $("key-input").value.trim() || null;
  await loadModel();
}

// -- the image ------------------------------------------------------------------------------------
function setImage(file, { expected = null } = {}) {
  state.image = file;
  state.expected = expected;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  const preview = $("preview");
  preview.hidden = !file;
  if (file) {
    preview.src = state.previewUrl;
    preview.alt = `Preview of ${file.name}`;
  } else {
    preview.removeAttribute("src");
  }
  $("drop").classList.toggle("has-image", Boolean(file));
  $("image-name").textContent = file ? `${file.name} (${formatInt(file.size)} bytes)` : "No image";
  $("clear-image").disabled = !file;
}

function wireImageInput() {
  const input = $("image-input");
  input.addEventListener("change", () => setImage(input.files[0] || null));
  $("clear-image").addEventListener("click", () => {
    input.value = "";
    setImage(null);
  });
  // A file the browser cannot show is still sent: the server says what is wrong with it.
  $("preview").addEventListener("error", () => {
    if (!state.image) return;
    $("preview").hidden = true;
    $("image-name").textContent = `${state.image.name}: no preview (not an image this browser shows)`;
  });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) setImage(file);
  });
}

// -- examples -------------------------------------------------------------------------------------
function exampleButton(example) {
  const thumb = el("img", { alt: "", class: "thumb" });
  const button = el("button", { type: "button", class: "example", dataset: { id: example.id } },
    thumb,
    el("span", { class: "example-kind", text: example.kind ? humanize(example.kind) : `#${example.id}` }),
    el("span", { class: "example-text", text: example.text || "(no text)" }));
  button.setAttribute("aria-label", `Example ${example.id}${example.kind ? `, ${humanize(example.kind)}` : ""}: ` +
    `${example.text || "no text"}`);
  // With an API key the image needs the Authorization header, which an <img src> cannot send.
  const file = api.blob(example.image_url).then((blob) => {
    const extension = blob.type.split("/")[1] || "img";
    thumb.src = URL.createObjectURL(blob);
    return new File([blob], `example-${example.id}.${extension}`, { type: blob.type });
  });
  file.catch(() => button.classList.add("broken"));
  button.addEventListener("click", async () => {
    try {
      setImage(await file, { expected: example.label });
    } catch (error) {
      showError(error);
      return;
    }
    $("image-input").value = "";
    $("text-input").value = example.text;
    announce(`Example ${example.id} is in the form: press Classify to run it.`);
  });
  return button;
}

// -- classify and compare -------------------------------------------------------------------------
function fields(route) {
  const chosen = route ?? $("route-select").value;
  return {
    image: state.image,
    text: $("text-input").value,
    route: chosen,
    threshold: chosen === "auto" ? $("threshold-input").value.trim() : null,
    operating_point: !$("op-field").hidden && routerDecides(chosen) ? $("op-select").value : null,
    model: state.models.length > 1 ? state.model.name : null, // one model: the server's default
    explain: route === undefined && $("explain-input").checked ? "true" : null, // the compare view never explains
  };
}

async function classify(event) {
  event.preventDefault();
  if (!state.model) return;
  await busy(async () => {
    try {
      const { body, roundTripMs } = await api.classify(fields());
      hideError();
      announce(renderResult(state.model, body, { roundTripMs, expected: state.expected }));
    } catch (error) {
      showError(error);
    }
  });
}

async function compare() {
  if (!state.model) return;
  await busy(async () => {
    const run = (route) => api.classify(fields(route)).then(({ body }) => ({ body }), (error) => ({ error }));
    const experts = state.model.experts.map((e) => e.name);
    const [auto, ...runs] = await Promise.all([run("auto"), ...experts.map(run)]);
    if (auto.error) showError(auto.error);
    else hideError();
    renderCompare(state.model, auto, runs.map((result, i) => ({ expert: experts[i], ...result })));
    announce(`Compared ${experts.length} experts: ${$("compare-summary").textContent}`);
  });
}

function setButtons(enabled) {
  for (const id of ["classify-button", "compare-button"]) $(id).disabled = !enabled;
}

async function busy(work) {
  setButtons(false);
  $("result").setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    setButtons(true);
    $("result").removeAttribute("aria-busy");
  }
}

// -- messages -------------------------------------------------------------------------------------
function showError(error) {
  const known = error instanceof ApiError;
  const status = known ? error.status : 0;
  $("error-status").textContent = status === 0 ? "Network error" : STATUS_TEXT[status] || `${status}`;
  $("error-code").textContent = known ? error.code : "";
  $("error-message").textContent = error.message;
  $("error").hidden = false;
  // The answer and the comparison on screen belong to an earlier input: not to be read as this one's.
  $("result-cards").hidden = true;
  $("compare").hidden = true;
  if (status === 401) askForKey(error);
  announce(`Error: ${error.message}`);
}

function hideError() {
  $("error").hidden = true;
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").hidden = false;
}

function announce(text) {
  $("status").textContent = text;
}

// -- start ----------------------------------------------------------------------------------------
wireImageInput();
$("classify-form").addEventListener("submit", classify);
$("compare-button").addEventListener("click", compare);
$("route-select").addEventListener("change", updateRouterOptions);
$("key-form").addEventListener("submit", useKey);
$("text-input").addEventListener("input", () => (state.expected = null));
loadModel();
