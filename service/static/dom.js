// Small DOM helpers, number formats and the CSS bar charts every panel draws with.

export const $ = (id) => document.getElementById(id);

// el("li", {class: "x", dataset: {expert: "text"}}, "child", otherNode)
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

// Fixed locale: the tests read these figures back, and a figure should not change with the browser.
const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
export const formatInt = (value) => integer.format(value);
export const formatPercent = (ratio, digits = 1) => `${(100 * ratio).toFixed(digits).replace("-", "\u2212")}%`;
export const formatMs = (ms) => `${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)} ms`;
export const humanize = (name) => String(name).replaceAll("_", " ");

// Width through the CSSOM: the page's Content-Security-Policy forbids inline style attributes.
export function setWidth(node, ratio) {
  node.style.setProperty("width", `${Math.max(0, Math.min(1, ratio)) * 100}%`);
}

// One colour per expert, in the model's order, so an expert keeps its colour in every panel.
const PALETTE = 8;
export function colourClass(experts, name) {
  const index = experts.indexOf(name);
  return index < 0 ? "c-other" : `c${index % PALETTE}`;
}

// A list of horizontal bars: entries [{name, value, label?, chosen?, note?, colour?}], value in 0..1.
export function fillBars(list, entries, { format = formatPercent } = {}) {
  list.replaceChildren(
    ...entries.map((entry) => {
      const fill = el("span", { class: `fill ${entry.colour || ""} ${entry.chosen ? "chosen" : ""}` });
      setWidth(fill, entry.value);
      return el(
        "li",
        { class: `bar-row${entry.chosen ? " is-chosen" : ""}`, dataset: { name: entry.name, value: entry.value } },
        el("span", { class: "bar-name", text: entry.label ?? humanize(entry.name) },
          entry.note ? el("span", { class: "note", text: ` ${entry.note}` }) : null),
        el("span", { class: "bar" }, fill),
        el("span", { class: "bar-value", text: format(entry.value) }),
      );
    }),
  );
}

// Segments of one bar (a two-part importance bar, the live route mix): [{name, value, colour}].
export function fillStack(container, parts, describe) {
  const total = parts.reduce((sum, part) => sum + part.value, 0);
  container.replaceChildren(
    ...parts
      .filter((part) => part.value > 0)
      .map((part) => {
        const segment = el("span", { class: `segment ${part.colour}`, dataset: { name: part.name } });
        setWidth(segment, total > 0 ? part.value / total : 0);
        return segment;
      }),
  );
  container.setAttribute("aria-label", describe);
}
