// The mldbg-callbacks web UI: one page, hash routes, every number read from the server's /v1 API.
// No framework and no CDN: the package ships this file. Elements are built with h()/svg() and text
// nodes (never innerHTML), so names and ids coming from the traces cannot inject markup.
"use strict";

// The six issue categories, best to worst, with the colour every chart uses for them.
const CATEGORIES = [
  ["stable_coverage", "#1a7f37", "right and reliably handled"],
  ["operational_coverage", "#7cc47f", "right and accepted at the operating risk"],
  ["recessive_hotspot", "#f2c94c", "right but fragile: latent errors"],
  ["hotspot", "#f08c3a", "wrong, and the model knows it is unsure"],
  ["critical_hotspot", "#c0262d", "wrong and confidently accepted: silent failures"],
  ["aleatoric_hotspot", "#7b4fc9", "wrong because of the label: label noise or ambiguity"],
];
const CATEGORY_COLOUR = Object.fromEntries(CATEGORIES.map(([name, colour]) => [name, colour]));
const SERIES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
const PAGE_SIZE = 50;
const state = { key: sessionStorage.getItem("mldbg-key"), project: null, auth: false };
const resultCache = new Map();  // API path of a result -> its JSON, for this tab

// -- DOM helpers ---------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

function svg(tag, attrs, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) element.setAttribute(name, value);
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function fmt(value) {
  if (value === null || value === undefined || (typeof value === "number" && Number.isNaN(value))) return "–";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return String(Number(value.toPrecision(4)));
}

function pct(value) { return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`; }
function enc(part) { return encodeURIComponent(part); }
function title(name) { return name.replaceAll("_", " "); }

// -- API -----------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return options.raw ? response : response.json();
}

function projectPath() { return `/v1/projects/${enc(state.project)}`; }
function versionPath(model, version) { return `${projectPath()}/models/${enc(model)}/versions/${enc(version)}`; }
function resultPath(model, version, result) { return `${versionPath(model, version)}/results/${enc(result)}`; }

// -- routing -------------------------------------------------------------------------------------
function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query || "") };
}

function link(parts, params) {
  const query = params && [...new URLSearchParams(params)].length ? `?${new URLSearchParams(params)}` : "";
  return `#/${parts.map(enc).join("/")}${query}`;
}

function setParams(changes) {
  const { parts, params } = route();
  for (const [name, value] of Object.entries(changes)) {
    if (value === "" || value === null || value === undefined) params.delete(name);
    else params.set(name, value);
  }
  location.hash = link(parts, params);
}

let renderCount = 0;
async function render() {
  const app = document.getElementById("app");
  const token = ++renderCount;  // a newer navigation wins over a slower older one
  delete app.dataset.route;
  const { parts, params } = route();
  renderCrumbs(parts);
  const page = h("div", { "data-testid": "page" });
  try {
    if (!state.project && !(await signIn(app))) return;
    renderSession();
    if (parts[0] !== "models" || parts.length < 2) await homePage(page);
    else if (parts.length < 4) await modelPage(page, parts[1]);
    else if (parts.length < 6) await versionPage(page, parts[1], parts[3]);
    else {
      const [model, version, result, view] = [parts[1], parts[3], parts[5], parts[6] || "evaluation"];
      const pages = { evaluation: evaluationPage, samples: samplesPage, "label-tracker": labelTrackerPage,
                      compare: comparePage };
      if (!pages[view]) throw new ApiError(404, `no page ${view}`);
      await resultHeader(page, model, version, result, view);
      await pages[view](page, model, version, result, params);
    }
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      forgetKey();
      return render();
    }
    page.append(h("p", { class: "error", "data-testid": "error" }, error.message));
  }
  if (token !== renderCount) return;
  app.replaceChildren(page);
  app.dataset.route = location.hash;  // rendered: what the browser tests wait for
}

function renderCrumbs(parts) {
  const crumbs = [h("a", { href: "#/" }, "models")];
  if (parts[0] === "models" && parts[1]) crumbs.push(h("a", { href: link(parts.slice(0, 2)) }, parts[1]));
  if (parts[2] === "versions" && parts[3]) crumbs.push(h("a", { href: link(parts.slice(0, 4)) }, parts[3]));
  if (parts[4] === "results" && parts[5]) crumbs.push(h("a", { href: link(parts.slice(0, 6)) }, parts[5]));
  const items = crumbs.flatMap((crumb, i) => (i ? [h("span", { class: "sep" }, "/"), crumb] : [crumb]));
  document.getElementById("crumbs").replaceChildren(...items);
}

function renderSession() {
  const session = document.getElementById("session");
  if (!state.auth) { session.replaceChildren(`local store (no key) · project ${state.project}`); return; }
  session.replaceChildren(`project ${state.project}`,
    h("button", { class: "plain", "data-testid": "sign-out", onclick: () => { forgetKey(); render(); } }, "forget key"));
}

function forgetKey() {
  sessionStorage.removeItem("mldbg-key");
  state.key = null;
  state.project = null;
}

// -- sign in (mldbg serve: a key, kept in this tab's session storage) ----------------------------
async function signIn(app, message) {
  try {
    const who = await api("/v1/whoami");
    Object.assign(state, { project: who.project, auth: who.auth });
    return true;
  } catch (error) {
    if (!(error instanceof ApiError) || ![401, 403].includes(error.status)) throw error;
    if (state.key) message = error.status === 403 ? "This key was revoked." : "This key was not accepted.";
    forgetKey();
  }
  document.getElementById("session").replaceChildren();
  const input = h("input", { type: "password", name: "key", placeholder: "mldbg_…", autocomplete: "off",
                             "data-testid": "key-input" });
  const form = h("form", { class: "key card", "data-testid": "key-form" },
    h("h1", {}, "API key"),
    h("p", {}, "This server needs an API key of your project (", h("code", {}, "mldbg keys create --project P"),
      "; for ", h("code", {}, "mldbg ui --expose"), ", the key it printed). It is kept in this tab only."),
    input, h("button", { type: "submit" }, "Open"),
    message && h("p", { class: "error", "data-testid": "key-error" }, message));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    state.key = input.value.trim();
    sessionStorage.setItem("mldbg-key", state.key);
    if (await signIn(app)) render();
  });
  app.replaceChildren(form);
  return false;
}

// -- tables and charts ---------------------------------------------------------------------------
function table(rows, columns, { testid, cell } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { class: typeof rows[0]?.[c] === "string" ? "text" : "" }, title(c))));
  const body = rows.map((row) => h("tr", {}, columns.map((c) => {
    const custom = cell && cell(c, row);
    return h("td", { class: typeof row[c] === "string" ? "text" : "", "data-column": c }, custom ?? fmt(row[c]));
  })));
  return h("div", { class: "scroll" }, h("table", { "data-testid": testid }, h("thead", {}, head), h("tbody", {}, body)));
}

function rowKey(row) {  // "train · epoch 3": the dataset / epoch a row of a result table is about
  return ["dataset", "dataset_type", "n_epoch"].filter((c) => c in row)
    .map((c) => (c === "n_epoch" ? `epoch ${row[c]}` : row[c])).join(" · ");
}

// One stacked bar per dataset / epoch: the share of units in each category.
function categoryBars(rows, { testid = "categories-chart", labelWidth = 150 } = {}) {
  const width = 760, barHeight = 22, gap = 8;
  const chart = svg("svg", { width, height: rows.length * (barHeight + gap) + 4, "data-testid": testid, role: "img" });
  rows.forEach((row, i) => {
    const y = i * (barHeight + gap);
    chart.append(svg("text", { x: 0, y: y + 15, "font-size": 12 }, row.label ?? rowKey(row)));
    let x = labelWidth;
    for (const [name, colour] of CATEGORIES) {
      const share = row[`${name}_ratio`] || 0;
      const w = share * (width - labelWidth - 10);
      if (w <= 0) continue;
      chart.append(svg("rect", { x, y, width: w, height: barHeight, fill: colour, "data-category": name },
                       svg("title", {}, `${title(name)}: ${pct(share)}`)));
      if (w > 34) chart.append(svg("text", { x: x + w / 2, y: y + 15, "font-size": 11, "text-anchor": "middle",
                                             fill: "#fff" }, pct(share)));
      x += w;
    }
  });
  return chart;
}

function categoryLegend() {
  return h("div", { class: "legend" }, CATEGORIES.map(([name, colour, meaning]) =>
    h("span", { title: meaning }, h("i", { style: `background:${colour}` }), `${title(name)} — ${meaning}`)));
}

// White to dark red, as matplotlib's "Reds" (the report's colour map).
function red(fraction) {
  const stops = [[255, 245, 240], [252, 187, 161], [251, 106, 74], [203, 24, 29], [103, 0, 13]];
  const f = Math.min(Math.max(fraction, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(f), stops.length - 2), t = f - i;
  const rgb = stops[i].map((v, k) => Math.round(v + t * (stops[i + 1][k] - v)));
  return `rgb(${rgb.join(",")})`;
}

// An annotated heatmap: every cell shows its number; the colour scale runs from 0 to the largest value.
// The API already kept the rows and columns with the most units (as the HTML report).
function heatmap(map) {
  const rows = map.index.map((_, i) => i), cols = map.columns.map((_, j) => j);
  const clipped = map.rows_total > rows.length || map.columns_total > cols.length;
  const cell = Math.max(30, Math.min(56, 700 / Math.max(cols.length, 1)));
  const left = 10 + 7 * Math.max(4, ...rows.map((i) => map.index[i].length));
  const top = 14 + 6 * Math.max(4, ...cols.map((j) => map.columns[j].length));
  const values = rows.flatMap((i) => cols.map((j) => map.values[i][j])).filter((v) => v !== null);
  const max = Math.max(0, ...values);
  const integers = values.every(Number.isInteger) && max > 1;
  const width = left + cols.length * cell + 90, height = top + rows.length * 24 + 30;
  const chart = svg("svg", { width, height, role: "img", "data-testid": "heatmap-svg" });
  cols.forEach((j, c) => {
    const x = left + c * cell + cell / 2;
    chart.append(svg("text", { x, y: top - 6, "font-size": 11, transform: `rotate(-45 ${x} ${top - 6})` },
                     map.columns[j]));
  });
  rows.forEach((i, r) => {
    const y = top + r * 24;
    chart.append(svg("text", { x: left - 6, y: y + 16, "font-size": 11, "text-anchor": "end" }, map.index[i]));
    cols.forEach((j, c) => {
      const value = map.values[i][j];
      const fraction = max > 0 && value !== null ? value / max : 0;
      const text = value === null ? "–" : integers ? String(value) : String(Number(value.toFixed(3)));
      chart.append(
        svg("rect", { x: left + c * cell, y, width: cell - 1, height: 23, fill: value === null ? "#eee" : red(fraction) },
            svg("title", {}, `${map.index_name || "row"} ${map.index[i]}, ${map.columns_name || "column"} ${map.columns[j]}: ${text}`)),
        svg("text", { x: left + c * cell + cell / 2, y: y + 16, "font-size": 11, "text-anchor": "middle",
                      fill: fraction > 0.6 ? "#fff" : "#111", "data-row": map.index[i], "data-column": map.columns[j],
                      class: "cell" }, text));
    });
  });
  // colour scale
  const scaleX = left + cols.length * cell + 24, scaleH = Math.max(rows.length * 24, 60);
  const gradientId = `scale-${Math.random().toString(36).slice(2)}`;
  chart.append(svg("defs", {}, svg("linearGradient", { id: gradientId, x1: 0, y1: 1, x2: 0, y2: 0 },
    [0, 0.25, 0.5, 0.75, 1].map((o) => svg("stop", { offset: o, "stop-color": red(o) })))));
  chart.append(svg("rect", { x: scaleX, y: top, width: 14, height: scaleH, fill: `url(#${gradientId})`, stroke: "#ccc" }),
               svg("text", { x: scaleX + 18, y: top + 10, "font-size": 10 }, fmt(max)),
               svg("text", { x: scaleX + 18, y: top + scaleH, "font-size": 10 }, "0"));
  const axes = [map.index_name && `rows: ${map.index_name}`, map.columns_name && `columns: ${map.columns_name}`].filter(Boolean);
  if (axes.length) chart.append(svg("text", { x: 4, y: 12, "font-size": 11, fill: "#667085" }, axes.join(" · ")));
  return h("figure", { "data-testid": "heatmap" }, h("figcaption", {}, map.title),
           clipped && h("p", { class: "muted" }, `showing the ${rows.length} of ${map.rows_total} rows and ${cols.length} of ${map.columns_total} columns with the most units`),
           chart);
}

// LabelTracker: one line per label (mean per epoch) with its mean ± std band.
function lineChart(rows, metric) {
  const labels = [...new Set(rows.map((r) => r.label))];
  const epochs = [...new Set(rows.map((r) => r.n_epoch))].sort((a, b) => a - b);
  const values = rows.flatMap((r) => [r.low, r.mean, r.high]).filter((v) => v !== null);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const width = 820, height = 380, left = 56, right = 20, top = 14, bottom = 40;
  const x = (e) => left + (epochs.length > 1 ? (epochs.indexOf(e) / (epochs.length - 1)) : 0.5) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  const chart = svg("svg", { width, height, role: "img", "data-testid": "label-tracker-chart" });
  for (let k = 0; k <= 4; k++) {
    const v = lo + (k / 4) * (hi - lo);
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), stroke: "#e4e7ec" }),
                 svg("text", { x: left - 6, y: y(v) + 4, "font-size": 10, "text-anchor": "end" }, fmt(v)));
  }
  for (const e of epochs) chart.append(svg("text", { x: x(e), y: height - bottom + 16, "font-size": 11, "text-anchor": "middle" }, e));
  chart.append(svg("text", { x: (left + width) / 2, y: height - 6, "font-size": 11, "text-anchor": "middle" }, "epoch"),
               svg("text", { x: 12, y: top + 8, "font-size": 11 }, metric));
  labels.forEach((label, i) => {
    const colour = SERIES[i % SERIES.length];
    const points = rows.filter((r) => r.label === label).sort((a, b) => a.n_epoch - b.n_epoch);
    const band = points.filter((p) => p.low !== null && p.high !== null);
    if (band.length > 1) {
      const outline = [...band.map((p) => `${x(p.n_epoch)},${y(p.high)}`), ...band.reverse().map((p) => `${x(p.n_epoch)},${y(p.low)}`)];
      chart.append(svg("polygon", { points: outline.join(" "), fill: colour, opacity: 0.08 }));
    }
    const line = points.filter((p) => p.mean !== null).map((p) => `${x(p.n_epoch)},${y(p.mean)}`).join(" ");
    chart.append(svg("polyline", { points: line, fill: "none", stroke: colour, "stroke-width": 2, "data-label": label }));
    for (const p of points) if (p.mean !== null)
      chart.append(svg("circle", { cx: x(p.n_epoch), cy: y(p.mean), r: 3, fill: colour },
                       svg("title", {}, `label ${label}, epoch ${p.n_epoch}: ${fmt(p.mean)} (${fmt(p.low)} … ${fmt(p.high)})`)));
  });
  const legend = h("div", { class: "legend" }, labels.map((label, i) =>
    h("span", {}, h("i", { style: `background:${SERIES[i % SERIES.length]}` }), `label ${label}`)));
  return [chart, legend];
}

function select(name, options, value, onchange) {
  return h("label", {}, title(name),
    h("select", { name, "data-testid": `filter-${name}`, onchange: (event) => onchange(event.target.value) },
      options.map(([optionValue, text]) => h("option", { value: optionValue, selected: String(optionValue) === String(value ?? "") }, text))));
}

// -- pages ---------------------------------------------------------------------------------------
async function homePage(page) {
  const models = await api(`${projectPath()}/models`);
  page.append(h("h1", {}, "Models"));
  if (!models.length) {
    page.append(h("p", { class: "muted", "data-testid": "empty" }, "No traces yet: add a tracer or a callback to a training run."));
    return;
  }
  const rows = [];
  for (const model of models) {
    for (const summary of await api(`${projectPath()}/models/${enc(model.model_name)}/versions`)) rows.push(summary);
  }
  page.append(table(rows, ["model_name", "version_name", "task", "epochs"], {
    testid: "models",
    cell: (column, row) => {
      if (column === "model_name") return h("a", { href: link(["models", row.model_name]) }, row.model_name);
      if (column === "version_name") return h("a", { href: link(["models", row.model_name, "versions", row.version_name]) }, row.version_name);
      if (column === "epochs") return epochText(row.epochs);
      return null;
    },
  }));
}

function epochText(epochs) {
  return Object.entries(epochs || {}).map(([dataset, list]) => `${dataset}: ${list.length} epoch${list.length === 1 ? "" : "s"}`).join(", ");
}

async function modelPage(page, model) {
  const versions = await api(`${projectPath()}/models/${enc(model)}/versions`);
  page.append(h("h1", {}, model),
    table(versions, ["version_name", "task", "num_classes", "epochs"], {
      testid: "versions",
      cell: (column, row) => column === "version_name"
        ? h("a", { href: link(["models", model, "versions", row.version_name]) }, row.version_name)
        : column === "epochs" ? epochText(row.epochs) : null,
    }));
}

async function versionPage(page, model, version) {
  const summary = await api(versionPath(model, version));
  page.append(h("h1", {}, `${model} / ${version}`),
              h("p", { class: "muted" }, `${summary.task}`, summary.num_classes ? ` · ${summary.num_classes} classes` : ""));
  // epochs x datasets: the committed rows of each partition
  const datasets = [...new Set(summary.partitions.map((p) => p.dataset_type))];
  const epochs = [...new Set(summary.partitions.map((p) => p.n_epoch))].sort((a, b) => a - b);
  const grid = datasets.map((dataset) => {
    const row = { dataset_type: dataset };
    for (const e of epochs) {
      const p = summary.partitions.find((q) => q.dataset_type === dataset && q.n_epoch === e);
      row[`epoch ${e}`] = p ? `${p.rows}${p.complete ? "" : ` (${p.ranks_committed}/${p.world_size} ranks)`}` : "";
    }
    return row;
  });
  page.append(h("h2", {}, "Traced epochs (rows per dataset and epoch)"),
              grid.length ? table(grid, ["dataset_type", ...epochs.map((e) => `epoch ${e}`)], { testid: "partitions" })
                          : h("p", { class: "muted" }, "No committed epoch yet."));
  page.append(h("h2", {}, "Evaluations"));
  if (summary.results.length) {
    page.append(table([...summary.results].reverse(), ["result_name", "created_at", "n_epoch", "epochs"], {
      testid: "results",
      cell: (column, row) => column === "result_name"
        ? h("a", { href: link(["models", model, "versions", version, "results", row.result_name]) }, row.result_name)
        : column === "epochs" ? epochText(row.epochs) : column === "n_epoch" ? (row.n_epoch ?? "all") : null,
    }));
  } else page.append(h("p", { class: "muted" }, "No evaluation yet."));
  page.append(evaluationForm(model, version));
}

function evaluationForm(model, version) {
  const name = h("input", { name: "result_name", placeholder: "result name (optional)", "data-testid": "result-name" });
  const epochs = h("select", { name: "n_epoch" }, h("option", { value: "latest" }, "newest epoch"), h("option", { value: "all" }, "all epochs"));
  const status = h("span", { class: "progress", "data-testid": "job-status" });
  const button = h("button", { type: "submit", "data-testid": "evaluate" }, "Request evaluation");
  const form = h("form", { class: "filters card" }, h("label", {}, "result name", name), h("label", {}, "epochs", epochs), button, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      const body = { n_epoch: epochs.value, ...(name.value.trim() ? { result_name: name.value.trim() } : {}) };
      let job = await api(`${versionPath(model, version)}/evaluations`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      while (!["done", "failed"].includes(job.status)) {
        status.textContent = `${job.status} ${job.stage || ""} ${job.total ? `${job.done}/${job.total}` : ""}`;
        await new Promise((resolve) => setTimeout(resolve, 300));
        job = await api(`${projectPath()}/jobs/${job.job_id}`);
      }
      if (job.status === "failed") throw new Error(job.error);
      resultCache.delete(resultPath(model, version, job.result_name));  // a result saved again under its name
      location.hash = link(["models", model, "versions", version, "results", job.result_name]);
    } catch (error) {
      status.replaceChildren(h("span", { class: "error" }, error.message));
      button.disabled = false;
    }
  });
  return form;
}

async function getResult(model, version, result) {
  const path = resultPath(model, version, result);
  if (!resultCache.has(path)) resultCache.set(path, await api(path));
  return resultCache.get(path);
}

async function resultHeader(page, model, version, result, view) {
  const res = await getResult(model, version, result);
  const base = ["models", model, "versions", version, "results", result];
  const tab = (name, text) => h("a", { href: link(name === "evaluation" ? base : [...base, name]),
                                       class: view === name ? "active" : "", "data-testid": `tab-${name}` }, text);
  const report = h("a", { href: "#", "data-testid": "report-link", onclick: (event) => { event.preventDefault(); openReport(model, version, result); } }, "HTML report");
  page.append(h("h1", {}, `${model} / ${version} · ${result}`),
    h("p", { class: "muted" }, `${res.meta.task} · created ${res.meta.created_at} · `, epochText(res.meta.epochs)),
    h("div", { class: "tabs" }, tab("evaluation", "Evaluation"), tab("samples", "Samples"),
      tab("label-tracker", "LabelTracker"), tab("compare", "Compare"), report));
}

async function openReport(model, version, result) {
  const response = await api(`${resultPath(model, version, result)}/report.html`, { raw: true });
  const url = URL.createObjectURL(new Blob([await response.text()], { type: "text/html" }));
  window.open(url, "_blank");
}

async function evaluationPage(page, model, version, result) {
  const [res, maps] = await Promise.all([getResult(model, version, result), api(`${resultPath(model, version, result)}/heatmaps`)]);
  const samplesLink = (params) => link(["models", model, "versions", version, "results", result, "samples"], params);
  page.append(h("h2", {}, "Metrics"), table(res.metrics, Object.keys(res.metrics[0] || {}), { testid: "metrics" }));

  page.append(h("h2", {}, "Issue categories"), categoryLegend(), categoryBars(res.categories),
    table(res.categories, Object.keys(res.categories[0] || {}), {
      testid: "categories",
      cell: (column, row) => (column.endsWith("_ratio") ? pct(row[column]) : null),
    }));

  // error codes, grouped by dataset / epoch, then by category (worst first)
  page.append(h("h2", {}, "Error codes: what went wrong and what to do"));
  const groups = new Map();
  for (const issue of res.issues) {
    const key = rowKey(issue);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(issue);
  }
  const order = Object.fromEntries(CATEGORIES.map(([name], i) => [name, -i]));
  const issues = h("div", { "data-testid": "issues" });
  [...groups.entries()].reverse().forEach(([key, list], index) => {
    const details = h("details", { open: index === 0 }, h("summary", {}, h("strong", {}, key || "all units"),
      ` — ${list.reduce((a, i) => a + i.count, 0)} units`));
    for (const issue of [...list].sort((a, b) => order[a.category] - order[b.category] || b.count - a.count)) {
      const filter = { category: issue.category, error_code: issue.error_code,
                       dataset_type: issue.dataset ?? issue.dataset_type, ...(issue.n_epoch !== undefined ? { n_epoch: issue.n_epoch } : {}) };
      details.append(h("div", { class: "card issue", style: `border-left-color:${CATEGORY_COLOUR[issue.category]}`,
                                "data-testid": "issue", "data-code": issue.error_code },
        h("h3", {}, h("span", { class: "badge", style: `background:${CATEGORY_COLOUR[issue.category]}` }, title(issue.category)),
          h("code", {}, issue.error_code), h("span", { "data-testid": "issue-count" }, `${issue.count} units`),
          h("span", { class: "muted" }, pct(issue.ratio)), h("span", { class: "share", style: `width:${Math.round(200 * issue.ratio)}px` }),
          h("a", { href: samplesLink(filter) }, "browse")),
        h("p", {}, issue.description),
        h("p", {}, h("strong", {}, "Recommended: "), issue.recommendation),
        issue.top_labels && h("p", { class: "muted" }, "Most affected labels: ", issue.top_labels),
        issue.confused_pairs && h("p", { class: "muted" }, "Confused (label→prediction): ", issue.confused_pairs),
        issue.top_regions && h("p", { class: "muted" }, "Regions: ", issue.top_regions),
        issue.examples?.length && h("p", { class: "ids" }, "Examples: ",
          issue.examples.map((id) => h("a", { href: samplesLink({ ...filter, input_id: id }) }, id)))));
    }
    issues.append(details);
  });
  page.append(issues);

  page.append(h("h2", {}, "Heatmaps"), h("div", { "data-testid": "heatmaps" }, maps.map(heatmap)));
  if (res.per_class) page.append(h("h2", {}, "Per class"), table(res.per_class, Object.keys(res.per_class[0] || {}), { testid: "per-class" }));
  if (res.tide) page.append(h("h2", {}, "TIDE error types (dAP: AP gained by fixing each type)"),
                            table(res.tide, Object.keys(res.tide[0] || {}), { testid: "tide" }));
  if (res.error_proba?.length) page.append(h("h2", {}, "How well error_proba ranks the errors"),
                                           table(res.error_proba, Object.keys(res.error_proba[0]), { testid: "error-proba" }));
  if (res.meta.notes?.length) page.append(h("details", {}, h("summary", {}, `Notes (${res.meta.notes.length})`),
                                               h("ul", {}, res.meta.notes.map((n) => h("li", {}, n)))));
}

const FIRST_COLUMNS = ["input_id", "object_id", "unit", "dataset_type", "n_epoch", "label", "pred", "score", "correct",
                       "category", "error_code", "error_type", "error_proba", "loss", "margin", "region", "slice", "size"];

async function samplesPage(page, model, version, result, params) {
  const res = await getResult(model, version, result);
  const filters = Object.fromEntries([...params].filter(([name]) => name !== "offset"));
  const offset = Number(params.get("offset") || 0);
  const query = new URLSearchParams({ ...filters, offset, limit: PAGE_SIZE });
  const units = await api(`${resultPath(model, version, result)}/tables/samples?${query}`);
  const datasets = Object.keys(res.meta.epochs || {});
  const epochs = filters.dataset_type ? res.meta.epochs[filters.dataset_type] || [] : [...new Set(Object.values(res.meta.epochs || {}).flat())];
  const codes = [...new Set(res.issues.filter((i) => !filters.category || i.category === filters.category).map((i) => i.error_code))].sort();
  const region = h("input", { name: "region", value: filters.region || "", placeholder: res.meta.task === "classification" ? "e.g. 3" : "e.g. 2:small",
                              "data-testid": "filter-region", onchange: (event) => setParams({ region: event.target.value.trim(), offset: "" }) });
  const change = (name) => (value) => setParams({ [name]: value, offset: "", ...(name === "category" ? { error_code: "" } : {}) });
  page.append(h("div", { class: "filters card" },
    select("dataset_type", [["", "all"], ...datasets.map((d) => [d, d])], filters.dataset_type, change("dataset_type")),
    select("n_epoch", [["", "all"], ...epochs.map((e) => [e, e])], filters.n_epoch, change("n_epoch")),
    select("category", [["", "all"], ...CATEGORIES.map(([name]) => [name, title(name)])], filters.category, change("category")),
    select("error_code", [["", "all"], ...codes.map((c) => [c, c])], filters.error_code, change("error_code")),
    select("label", [["", "all"], ...res.labels.map((c) => [c, c])], filters.label, change("label")),
    h("label", {}, "region", region),
    filters.input_id && h("span", {}, `input id ${filters.input_id} `, h("a", { href: "#", onclick: (event) => { event.preventDefault(); setParams({ input_id: "" }); } }, "(clear)")),
    Object.keys(filters).length > 0 && h("button", { class: "plain", "data-testid": "clear-filters", onclick: () => setParams(Object.fromEntries(Object.keys(filters).map((k) => [k, ""]))) }, "clear all")));
  const last = Math.min(offset + PAGE_SIZE, units.total);
  page.append(h("div", { class: "pager" },
    h("span", { "data-testid": "samples-total" }, `${units.total} units`),
    h("span", { class: "muted" }, units.total ? `showing ${offset + 1}–${last}` : ""),
    h("button", { class: "plain", disabled: offset === 0, "data-testid": "previous", onclick: () => setParams({ offset: Math.max(0, offset - PAGE_SIZE) || "" }) }, "previous"),
    h("button", { class: "plain", disabled: last >= units.total, "data-testid": "next", onclick: () => setParams({ offset: offset + PAGE_SIZE }) }, "next")));
  const columns = [...FIRST_COLUMNS.filter((c) => units.columns.includes(c)), ...units.columns.filter((c) => !FIRST_COLUMNS.includes(c))];
  page.append(table(units.rows, columns, {
    testid: "samples",
    cell: (column, row) => column === "category" && row.category
      ? h("span", { class: "badge", style: `background:${CATEGORY_COLOUR[row.category]}` }, title(row.category)) : null,
  }));
}

async function labelTrackerPage(page, model, version, result, params) {
  const res = await getResult(model, version, result);
  const datasets = Object.keys(res.meta.epochs || {});
  const dataset = params.get("dataset_type") || (datasets.includes("train") ? "train" : datasets[0]);
  // the signals kept per unit and epoch (the result's history table): its numeric columns
  const history = await api(`${resultPath(model, version, result)}/tables/history?${new URLSearchParams({ dataset_type: dataset, limit: 1 })}`);
  const metrics = history.columns.filter((c) => !["dataset_type", "n_epoch", "input_id", "label"].includes(c)
                                             && ["number", "boolean"].includes(typeof history.rows[0]?.[c]));
  const metric = params.get("metric") || (metrics.includes("loss") ? "loss" : metrics[0]);
  page.append(h("p", { class: "muted" }, "Per label and epoch: the mean of the signal over the label's samples, with a mean ± standard deviation band (FastEstimator's LabelTracker)."),
    h("div", { class: "filters card" },
      select("dataset_type", datasets.map((d) => [d, d]), dataset, (value) => setParams({ dataset_type: value })),
      select("metric", metrics.map((m) => [m, m]), metric, (value) => setParams({ metric: value }))));
  const curves = await api(`${resultPath(model, version, result)}/label_tracker?${new URLSearchParams({ metric, dataset_type: dataset })}`);
  if (!curves.rows.length) { page.append(h("p", { class: "muted" }, "No units for this dataset.")); return; }
  page.append(h("figure", {}, h("figcaption", {}, `${metric} per label, ${dataset}`), lineChart(curves.rows, metric)),
    h("details", {}, h("summary", {}, "Values"), table(curves.rows, curves.columns, { testid: "label-tracker" })));
}

async function comparePage(page, model, version, result, params) {
  const candidates = [];
  for (const m of await api(`${projectPath()}/models`)) {
    for (const v of m.versions) {
      for (const r of (await api(versionPath(m.model_name, v))).results) {
        if (!(m.model_name === model && v === version && r.result_name === result)) candidates.push([m.model_name, v, r.result_name]);
      }
    }
  }
  if (!candidates.length) { page.append(h("p", { class: "muted" }, "No other result to compare with yet.")); return; }
  const chosen = params.get("with") || candidates.find(([m, v]) => m === model && v !== version)?.join("/") || candidates[0].join("/");
  page.append(h("div", { class: "filters card" },
    select("with", candidates.map((c) => [c.join("/"), c.join(" / ")]), chosen, (value) => setParams({ with: value }))));
  const [otherModel, otherVersion, otherResult] = candidates.find((c) => c.join("/") === chosen) || chosen.split("/");
  const query = new URLSearchParams({ other_model: otherModel, other_version: otherVersion, other_result: otherResult });
  const [frame, mine, other] = await Promise.all([
    api(`${resultPath(model, version, result)}/compare?${query}`),
    getResult(model, version, result), getResult(otherModel, otherVersion, otherResult)]);
  const label = (res) => `${res.meta.version_name}:${res.meta.result_name}`;
  const bars = (res) => res.categories.map((row) => ({ ...row, label: `${label(res)} ${rowKey(row)}` }));
  page.append(h("h2", {}, "Issue categories side by side"), categoryLegend(),
              categoryBars([...bars(mine), ...bars(other)].sort((a, b) => rowKey(a).localeCompare(rowKey(b))), { testid: "compare-chart", labelWidth: 230 }));
  const lowerIsBetter = (metric) => /loss|entropy|hotspot/.test(metric);
  page.append(h("h2", {}, "Metrics and category shares (delta: second minus first)"),
    table(frame.rows, frame.columns, {
      testid: "compare",
      cell: (column, row) => {
        if (column !== "delta" || !row.delta || row.metric === "counts") return null;
        const better = (row.delta > 0) !== lowerIsBetter(row.metric);
        return h("span", { class: better ? "pos" : "neg" }, `${row.delta > 0 ? "▲" : "▼"} ${fmt(row.delta)}`);
      },
    }));
}

window.addEventListener("hashchange", render);
render();
