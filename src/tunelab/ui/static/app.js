// tunelab ui: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every value from the server or the user's data is put on the page with textContent (never
// innerHTML), so a record containing markup is shown, not run.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const SVGNS = "http://www.w3.org/2000/svg";
const KEEP = "tunelab.ui.";
const state = {
  info: null, data: null, plan: null, runs: [], selected: null, metrics: [], started: null,
  compareRun: null, chat: {}, timers: {},
};

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "title") node.title = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const sign = n < 0 ? "-" : "";
  n = Math.abs(n);
  if (n >= 1024 ** 3) return `${sign}${(n / 1024 ** 3).toFixed(2)} GiB`;
  if (n >= 1024 ** 2) return `${sign}${(n / 1024 ** 2).toFixed(0)} MiB`;
  if (n >= 1024) return `${sign}${(n / 1024).toFixed(0)} KiB`;
  return `${sign}${n} B`;
}

function count(n) {
  if (n === null || n === undefined) return "-";
  for (const [u, s] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (Math.abs(n) >= s) return `${(n / s).toPrecision(3)}${u}`;
  }
  return String(Math.round(n));
}

function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function fix(x, digits = 4) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "-";
}

function fig(k, v, cls) {
  return el("div", { class: `fig ${cls || ""}` }, el("div", { class: "k", text: k }),
    el("div", { class: "v", text: v }));
}

function debounce(key, ms, fn) {
  clearTimeout(state.timers[key]);
  state.timers[key] = setTimeout(fn, ms);
}

class ApiError extends Error {
  constructor(status, errors) {
    super(errors.map((e) => e.message).join("; "));
    this.status = status;
    this.errors = errors;
  }
}

// Every call sends X-Tunelab-UI: the server refuses changes without it (a page on another
// site cannot add it without a CORS preflight the server never approves).
async function api(method, url, body, raw) {
  const opts = { method, headers: { "X-Tunelab-UI": "1" } };
  if (raw !== undefined) opts.body = raw;
  else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url, opts);
  } catch (exc) {
    throw new ApiError(0, [{ field: "form", message: "cannot reach the tunelab ui server: is it still running?" }]);
  }
  let payload = null;
  try { payload = await res.json(); } catch (exc) { payload = null; }
  if (!res.ok) {
    throw new ApiError(res.status, (payload && payload.errors) || [{ field: "form", message: `HTTP ${res.status}` }]);
  }
  return payload;
}

// ------------------------------------------------------------------ errors next to fields

function clearErrors(scope) {
  $$("[data-err]", scope).forEach((e) => { e.textContent = ""; });
  $$(".invalid", scope).forEach((e) => e.classList.remove("invalid"));
  const other = $(".other-errs", scope);
  if (other) other.replaceChildren();
}

function inputFor(field, scope) {
  return $(`[name="${field}"]`, scope) || $(`[data-mirror="${field}"]`, scope);
}

function errorText(e) {
  let where = "";
  if (e.line) where = `line ${e.line}`;
  if (e.data_field) where += `${where ? ", " : ""}field '${e.data_field}'`;
  return where ? `${where}: ${e.message}` : e.message;
}

// Show each error next to its field inside `scope`; with `global`, fields of other pages
// (the train form checks the data and plan settings too) are marked there and listed here.
function showErrors(scope, errors, global = false) {
  clearErrors(scope);
  if (global) $$("[data-err]").forEach((e) => { if (!scope.contains(e)) e.textContent = ""; });
  for (const e of errors) {
    const text = errorText(e);
    let slot = $(`[data-err="${e.field}"]`, scope);
    if (!slot && global) {
      const far = $$(`[data-err="${e.field}"]`).filter((s) => !scope.contains(s));
      if (far.length) {
        far.forEach((s) => { s.textContent = text; });
        const page = far[0].closest(".page");
        const name = page ? $(`nav a[data-page="${page.id.replace("page-", "")}"]`).textContent : "";
        const list = $(".other-errs", scope);
        if (list) list.append(el("li", {}, `${e.field} (${name.replace(/^\d+ /, "")} page): ${text}`));
        const input = inputFor(e.field, document);
        if (input) input.classList.add("invalid");
        continue;
      }
    }
    slot = slot || $('[data-err="form"]', scope);
    slot.textContent = slot.textContent ? `${slot.textContent}\n${text}` : text;
    const input = inputFor(e.field, scope);
    if (input) input.classList.add("invalid");
  }
}

async function busy(button, fn) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = `${label}…`;
  try { return await fn(); } finally { button.disabled = false; button.textContent = label; }
}

// ------------------------------------------------------------------ form values

function value(id) {
  const node = document.getElementById(id);
  if (!node) return undefined;
  if (node.type === "checkbox") return node.checked;
  const v = node.value.trim();
  if (v === "") return undefined;
  if (node.type === "number") {
    const n = Number(v);
    return Number.isFinite(n) ? n : v;
  }
  return v;
}

function pick(ids) {
  const out = {};
  for (const [key, id] of Object.entries(ids)) {
    const v = value(id);
    if (v !== undefined) out[key] = v;
  }
  return out;
}

const DATA_FIELDS = { format: "format", train_on: "train_on", max_length: "max_length",
  overlength: "overlength", val_fraction: "val_fraction" };
const PLAN_FIELDS = { method: "method", lora_r: "lora_r", max_length: "max_length",
  batch_size: "batch_size", grad_accum: "grad_accum", max_steps: "max_steps", epochs: "epochs",
  grad_ckpt: "grad_ckpt" };
const TRAIN_FIELDS = { model: "model", data: "data", ...DATA_FIELDS, ...PLAN_FIELDS, lr: "lr",
  eval_every: "eval_every", save_every: "save_every", device: "device", seed: "seed",
  objective: "objective", beta: "beta", replay: "replay", replay_ratio: "replay_ratio" };

// Inputs marked data-keep survive a reload; a mirror input edits the same setting elsewhere.
function keepInputs() {
  for (const node of $$("[data-keep]")) {
    const saved = localStorage.getItem(KEEP + node.id);
    if (saved !== null) {
      if (node.type === "checkbox") node.checked = saved === "1";
      else node.value = saved;
    }
    node.addEventListener("change", () => save(node));
    node.addEventListener("input", () => save(node));
  }
  for (const mirror of $$("[data-mirror]")) {
    const source = document.getElementById(mirror.dataset.mirror);
    mirror.value = source.value;
    mirror.addEventListener("input", () => {
      source.value = mirror.value;
      save(source);
      source.dispatchEvent(new Event("change"));
    });
    source.addEventListener("input", () => { mirror.value = source.value; });
    source.addEventListener("change", () => { mirror.value = source.value; });
  }
}

function save(node) {
  localStorage.setItem(KEEP + node.id, node.type === "checkbox" ? (node.checked ? "1" : "0") : node.value);
}

// ------------------------------------------------------------------ navigation

const PAGES = ["data", "plan", "train", "compare", "chat"];

function show(page) {
  if (!PAGES.includes(page)) page = "data";
  for (const p of PAGES) {
    $(`#page-${p}`).classList.toggle("shown", p === page);
    $(`nav a[data-page="${p}"]`).classList.toggle("active", p === page);
  }
  if (page === "plan") refreshPlan();
  if (page === "train") { trainSummary(); refreshRuns(); }
  if (page === "compare") { refreshRuns().then(() => { fillCompareRuns(); refreshCompare(); }); }
  if (page === "chat") refreshChat();
}

// ------------------------------------------------------------------ model and data

async function checkModel() {
  const scope = $("#data-form");
  const box = $("#model-info");
  const model = value("model");
  $('[data-err="model"]', scope).textContent = "";
  $("#model").classList.remove("invalid");
  box.replaceChildren();
  if (!model) return;
  try {
    const info = await api("POST", "/api/model", { model });
    const parts = [el("b", { text: info.kind }), ` ${info.path}`];
    if (info.arch) parts.push(` · ${count(info.arch.params)} parameters, ${info.arch.layers} layers`);
    if (info.licence) parts.push(" · licence ", el("b", { text: info.licence.id }), ` (${info.licence.category})`);
    box.replaceChildren(...parts);
  } catch (exc) {
    if (exc instanceof ApiError) showErrors(scope, exc.errors.filter((e) => e.field === "model"));
  }
}

async function uploadFile(file) {
  const scope = $("#data-form");
  clearErrors(scope);
  const result = await api("PUT", `/api/uploads/${encodeURIComponent(file.name)}`, undefined, file);
  $("#data").value = result.path;
  save($("#data"));
  return result;
}

async function inspect() {
  const scope = $("#data-form");
  const body = { model: value("model"), data: value("data"), ...pick(DATA_FIELDS) };
  try {
    const result = await api("POST", "/api/data/inspect", body);
    clearErrors(scope);
    state.data = result;
    renderData(result);
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    showErrors(scope, exc.errors);
  }
}

function renderData(r) {
  $("#data-result").classList.remove("hidden");
  const s = r.stats;
  const cards = [fig("format", r.format || "unknown"), fig("records", String(r.records))];
  if (s) {
    cards.push(fig("train / validation", `${s.train_examples} / ${s.val_examples}`));
    cards.push(fig("tokens (targets)", `${count(s.tokens)} (${count(s.target_tokens)})`));
    const over = s.over_length;
    cards.push(fig(`over ${s.max_length} tokens`, over ? `${over} ${s.overlength === "drop" ? "dropped" : s.overlength === "error" ? "refused" : "truncated"}` : "none", over ? "warn" : "ok"));
  }
  cards.push(fig("problems", String(r.n_errors), r.n_errors ? "bad" : "ok"));
  $("#data-summary").replaceChildren(...cards);

  const rows = r.errors.map((e) => el("tr", {}, el("td", { text: e.line ?? "-" }),
    el("td", { text: e.data_field ?? "" }), el("td", { text: e.message })));
  if (r.n_errors > r.errors.length) {
    rows.push(el("tr", {}, el("td"), el("td"), el("td", { class: "muted", text: `… and ${r.n_errors - r.errors.length} more` })));
  }
  $("#data-errors").replaceChildren(...rows);
  $("#data-error-count").textContent = r.n_errors ? `(${r.n_errors})` : "";
  $("#data-errors-card").classList.toggle("hidden", !r.n_errors);

  if (s) {
    $("#length-stats").replaceChildren(el("table", { class: "kv" },
      ...[["examples", s.examples], ["shortest / median / longest", `${s.min} / ${s.median} / ${s.max}`],
        ["mean (95th percentile)", `${s.mean.toFixed(1)} (${s.p95})`],
        ["mean as trained (capped at max length)", s.mean_trained.toFixed(1)],
        ["dropped (nothing left to learn)", s.dropped]]
        .map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })))));
    histogram($("#length-hist"), s.histogram, s.max_length);
  } else {
    $("#length-stats").replaceChildren(el("p", { class: "muted", text: "No example could be read." }));
    $("#length-hist").replaceChildren();
  }
  $("#examples").replaceChildren(...r.examples.map(renderExample));
  if (!r.examples.length) $("#examples").append(el("p", { class: "muted", text: "No example to show." }));
  if (state.info) trainSummary();
}

function renderTokens(segments) {
  const tokens = el("div", { class: "tokens" });
  for (const seg of segments) {
    const cls = seg.cut ? "cut" : seg.masked ? "masked" : "trained";
    const span = el("span", { class: `tok ${cls}`, title: `${seg.tokens} token${seg.tokens > 1 ? "s" : ""}${seg.masked ? ", label -100" : ""}` });
    // newlines are shown as ↵ and then broken, so the template's structure is visible
    const parts = seg.text.split("\n");
    parts.forEach((p, i) => {
      if (i > 0) span.append(el("span", { class: "nl", text: "↵" }), "\n");
      span.append(p);
    });
    tokens.append(span);
  }
  return tokens;
}

function renderExample(ex) {
  if (ex.parts) return renderPair(ex);
  const meta = `line ${ex.line} · ${ex.tokens} tokens, ${ex.target_tokens} trained on` +
    (ex.over_length ? " · longer than the sequence length: the struck-through part is cut" : "");
  return el("div", { class: "example" }, el("div", { class: "meta", text: meta }), renderTokens(ex.segments));
}

// A preference pair: the shared prompt (context), then each answer with the tokens whose
// log-probabilities DPO / ORPO compare.
function renderPair(ex) {
  const meta = `line ${ex.line} · prompt + longer answer ${ex.tokens} tokens, ${ex.target_tokens} answer tokens scored` +
    (ex.over_length ? " · longer than the sequence length: the prompt's start is cut" : "");
  const parts = ex.parts.map((part) => el("div", { class: `pair-part ${part.name}` },
    el("div", { class: "part-name", text: `${part.name} · ${part.tokens} tokens` }), renderTokens(part.segments)));
  return el("div", { class: "example pair" }, el("div", { class: "meta", text: meta }), ...parts);
}

function histogram(svg, h, limit) {
  svg.replaceChildren();
  if (!h.counts.length) return;
  const W = 480, H = 170, L = 36, B = 26, T = 8, R = 8;
  const maxCount = Math.max(...h.counts);
  const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
  const x = (v) => L + ((v - lo) / Math.max(1, hi - lo)) * (W - L - R);
  const y = (c) => H - B - (c / maxCount) * (H - B - T);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  h.counts.forEach((c, i) => {
    const x0 = x(h.edges[i]), x1 = x(h.edges[i + 1]);
    const bar = svgEl("rect", { class: `bar${h.edges[i + 1] > limit + 1 ? " over" : ""}`, x: x0 + 1,
      y: y(c), width: Math.max(1, x1 - x0 - 2), height: H - B - y(c) });
    bar.append(svgEl("title", {}, `${h.edges[i]}-${h.edges[i + 1] - 1} tokens: ${c}`));
    svg.append(bar);
  });
  svg.append(svgEl("text", { x: x(lo), y: H - 8, "text-anchor": "start" }, String(lo)));
  svg.append(svgEl("text", { x: x(hi), y: H - 8, "text-anchor": "end" }, String(hi)));
  svg.append(svgEl("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, String(maxCount)));
  svg.append(svgEl("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
  if (limit >= lo && limit <= hi) {
    svg.append(svgEl("line", { class: "limit", x1: x(limit), y1: T, x2: x(limit), y2: H - B }));
    svg.append(svgEl("text", { x: x(limit) + 4, y: T + 10 }, `max length ${limit}`));
  }
}

// ------------------------------------------------------------------ plan

function planBody() {
  const body = { model: value("model"), gpu: value("gpu"), ...pick(PLAN_FIELDS) };
  if (state.data && state.data.stats) {
    body.examples = state.data.stats.train_examples;
    body.avg_len = Math.round(state.data.stats.mean_trained * 10) / 10;
  }
  return body;
}

async function refreshPlan() {
  const scope = $("#plan-form");
  if (!value("model")) {
    showErrors(scope, [{ field: "form", message: "choose a model on the Model & data page first" }]);
    return;
  }
  try {
    const plan = await api("POST", "/api/plan", planBody());
    clearErrors(scope);
    state.plan = plan;
    renderPlan(plan);
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    showErrors(scope, exc.errors);
  }
}

const COMPONENT_LABELS = { weights: "base weights", adapters: "LoRA adapters", gradients: "gradients",
  optimizer: "optimizer state", activations: "activations", logits: "logits", workspace: "workspace",
  retained: "heap kept by the allocator", overlap: "never resident together", overhead: "runtime overhead" };

function renderPlan(plan) {
  $("#plan-result").classList.remove("hidden");
  const method = plan.selected;
  const mp = plan.methods[method];
  const mem = mp.memory;
  const fits = mp.fit !== "no";
  const time = mp.time;
  const lic = plan.licence;
  $("#plan-summary").replaceChildren(
    fig(`fits on ${plan.gpu.name}?`, mp.fit === "yes" ? "yes" : mp.fit === "paged" ? "only paged" : "no", fits ? "ok" : "bad"),
    fig("peak memory", `${bytes(mem.total)} of ${bytes(plan.gpu.usable_bytes)}`, fits ? "" : "bad"),
    fig("training time", time ? plan.readable[method].time : "-"),
    fig("trained parameters", `${count(mem.trainable_params)} (${(100 * mem.trainable_share).toPrecision(2)}%)`),
    fig("licence", lic.id, lic.category === "permissive" ? "ok" : "warn"),
  );
  // The bar is the peak, split into its parts (the negative "never resident together" is
  // taken off the largest ones in proportion); when it does not fit, a line marks the
  // usable memory inside it.
  const parts = Object.entries(mem).filter(([k, v]) => k in COMPONENT_LABELS && typeof v === "number" && v > 0);
  const positive = parts.reduce((a, [, v]) => a + v, 0);
  const bar = $("#plan-bar");
  bar.replaceChildren();
  parts.forEach(([k, v], i) => {
    const seg = el("div", { class: `c${i % 10}`, title: `${COMPONENT_LABELS[k]}: ${bytes(v)}` });
    seg.style.width = `${(100 * v) / positive}%`;
    bar.append(seg);
  });
  if (mem.total > plan.gpu.usable_bytes) {
    const limit = el("div", { class: "limit", title: `usable: ${bytes(plan.gpu.usable_bytes)}` });
    limit.style.left = `${(100 * plan.gpu.usable_bytes) / mem.total}%`;
    bar.append(limit);
  }
  const legend = el("div", { class: "stack-legend" }, ...parts.map(([k], i) =>
    el("span", {}, el("span", { class: `swatch c${i % 10}` }), COMPONENT_LABELS[k])));
  bar.after(legend);
  $$(".stack-legend").slice(0, -1).forEach((n) => n.remove());
  const rows = Object.keys(COMPONENT_LABELS).filter((k) => mem[k]).map((k) =>
    el("tr", {}, el("td", { text: COMPONENT_LABELS[k] }), el("td", { class: "num", text: bytes(mem[k]) })));
  rows.push(el("tr", { class: "best" }, el("td", { text: "peak" }), el("td", { class: "num", text: bytes(mem.total) })));
  rows.push(el("tr", {}, el("td", { text: `usable on ${plan.gpu.name}` }), el("td", { class: "num", text: bytes(plan.gpu.usable_bytes) })));
  if (time) rows.push(el("tr", {}, el("td", { text: "throughput assumed" }), el("td", { class: "num", text: `${count(time.tokens_per_second)} tokens/s` })));
  rows.push(el("tr", {}, el("td", { text: "time is for" }), el("td", { class: "num", text: plan.tokens_note })));
  $("#plan-memory").replaceChildren(...rows);

  $("#plan-licence").replaceChildren(el("div", { class: `licence ${lic.category}` },
    el("div", { class: "id", text: `${lic.id} · ${lic.category}` }), el("div", { text: lic.summary }),
    lic.warning ? el("div", { class: "err", text: lic.warning }) : null,
    el("div", { class: "muted", text: `read from: ${lic.source || "-"}` })));
  const head = el("tr", {}, ...["method", "", "peak memory", "fits", "time"].map((h) => el("th", { text: h })));
  const mrows = Object.entries(plan.methods).map(([name, m]) => el("tr", { class: name === method ? "best" : "" },
    el("td", { text: name }), el("td", { class: "muted", text: m.label }),
    el("td", { class: "num", text: bytes(m.memory.total) }), el("td", { text: m.fit }),
    el("td", { class: "num", text: plan.readable[name].time || "-" })));
  $("#plan-methods").replaceChildren(el("thead", {}, head), el("tbody", {}, ...mrows));
  $("#plan-advice").replaceChildren(...plan.advice.map((a) => el("li", { text: a })));
}

// ------------------------------------------------------------------ train

function trainSummary() {
  const box = $("#train-summary");
  const v = pick(TRAIN_FIELDS);
  const steps = v.max_steps ? `${v.max_steps} steps` : `${v.epochs ?? 1} epoch(s)`;
  const data = state.data && state.data.stats ? ` (${state.data.stats.train_examples} train / ${state.data.stats.val_examples} validation examples)` : "";
  const fitsNote = state.plan ? ` · plan: ${bytes(state.plan.methods[state.plan.selected].memory.total)} peak, fits: ${state.plan.methods[state.plan.selected].fit}` : "";
  box.replaceChildren("model ", el("b", { text: v.model || "(none)" }), " · data ",
    el("b", { text: v.data ? v.data.split("/").pop() : "(none)" }), data, " · ",
    el("b", { text: v.method || "lora" }), v.method === "full" ? "" : ` r=${v.lora_r ?? 16}`,
    ` · sequence ${v.max_length ?? 1024} · batch ${v.batch_size ?? 4} × ${v.grad_accum ?? 1} · ${steps}${fitsNote} · `,
    el("a", { href: "#data", text: "change data" }), " · ", el("a", { href: "#plan", text: "change plan" }));
}

function trainConfig() {
  const config = pick(TRAIN_FIELDS);
  if (!config.replay) { delete config.replay; delete config.replay_ratio; }  // replay off
  return config;
}

async function startRun() {
  const scope = $("#train-form");
  const body = { name: value("name"), config: trainConfig(), allow_parallel: value("allow_parallel") };
  try {
    const run = await api("POST", "/api/runs", body);
    showErrors(scope, [], true);
    await refreshRuns();
    selectRun(run.name);
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    showErrors(scope, exc.errors, true);
  }
}

async function refreshRuns() {
  try {
    const r = await api("GET", "/api/runs");
    state.runs = r.runs;
    $("#workspace").textContent = r.workspace;
  } catch (exc) {
    return;
  }
  const active = state.runs.filter((r) => r.state === "running" || r.state === "stopping" || r.compare === "running");
  $("#activity").replaceChildren(...(active.length ? [el("span", { class: "dot" }),
    active.map((r) => r.state === "running" || r.state === "stopping" ? `${r.name}: step ${r.step}/${r.total_steps ?? "?"}` : `${r.name}: comparing`).join(" · ")] : ["no job running"]));
  const rows = state.runs.map((r) => {
    const tr = el("tr", { class: r.name === state.selected ? "selected" : "", "data-run": r.name },
      el("td", { text: r.name }), el("td", {}, el("span", { class: `badge ${r.state}`, text: r.state })),
      el("td", { class: "num", text: `${r.step}${r.total_steps ? "/" + r.total_steps : ""}` }),
      el("td", { class: "num", text: fix(r.train_loss, 3) }));
    tr.addEventListener("click", () => selectRun(r.name));
    return tr;
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "No runs yet." })));
  $("#runs").replaceChildren(...rows);
  if (!state.selected && state.runs.length) {
    // reattach: the run this browser last watched, else a running one, else the newest
    const wanted = state.runs.find((r) => r.name === localStorage.getItem(KEEP + "selected"));
    const running = state.runs.find((r) => r.state === "running" || r.state === "stopping");
    selectRun((wanted || running || state.runs[0]).name);
  }
}

function selectRun(name) {
  state.selected = name;
  state.metrics = [];
  state.started = null;
  localStorage.setItem(KEEP + "selected", name);
  $$("#runs tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.run === name));
  clearTimeout(state.timers.run);
  pollRun();
}

async function pollRun() {
  const name = state.selected;
  if (!name) return;
  const last = state.metrics.length ? state.metrics[state.metrics.length - 1].step : 0;
  let run;
  try {
    run = await api("GET", `/api/runs/${encodeURIComponent(name)}?since=${last}`);
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 404) { state.selected = null; return; }
    state.timers.run = setTimeout(pollRun, 3000);
    return;
  }
  if (name !== state.selected) return;
  if (run.started !== state.started) {
    // a new start or resume rewrites metrics.jsonl from its checkpoint: read it whole again
    const changed = state.started !== null;
    state.started = run.started;
    if (changed && last) { state.metrics = []; return pollRun(); }
  }
  state.metrics.push(...run.metrics);
  renderRun(run);
  const active = run.state === "running" || run.state === "stopping";
  if (active) state.timers.run = setTimeout(pollRun, 1000);
  else refreshRuns();
}

function renderRun(run) {
  $("#run-title").textContent = run.name;
  const badge = $("#run-state");
  badge.textContent = run.state;
  badge.className = `badge ${run.state}`;
  const active = run.state === "running" || run.state === "stopping";
  $("#stop").classList.toggle("hidden", !active);
  $("#stop").disabled = run.state === "stopping";
  const resumable = ["stopped", "failed", "lost"].includes(run.state);
  $("#resume").classList.toggle("hidden", !resumable);
  $("#resume").textContent = run.has_checkpoint ? "Resume from checkpoint" : "Restart";
  const report = $("#run-report");
  report.classList.toggle("hidden", !run.has_report || active);
  report.href = `/runs/${encodeURIComponent(run.name)}/report.html`;
  const error = $("#run-error");
  error.classList.toggle("hidden", !run.error);
  error.textContent = run.error || "";
  const total = run.total_steps;
  $("#run-progress").style.width = total ? `${Math.min(100, (100 * run.step) / total)}%` : "0";
  const figs = [fig("step", `${run.step}${total ? " / " + total : ""}`), fig("train loss", fix(run.train_loss)),
    fig("validation loss", fix(run.val_loss)), fig("tokens/s", run.tokens_per_s ? run.tokens_per_s.toFixed(0) : "-"),
    fig("peak memory", bytes(run.peak_memory))];
  if (active) figs.push(fig("ETA", duration(run.eta_s)), fig("running for", duration(run.elapsed_s)));
  else if (run.summary && run.summary.train_seconds) figs.push(fig("training time", duration(run.summary.train_seconds)));
  const last = [...state.metrics].reverse().find((m) => typeof m["rewards/accuracy"] === "number");
  if (last) {
    figs.push(fig("preference accuracy", fix(last["rewards/accuracy"], 2)),
      fig("reward margin", fix(last["rewards/margins"], 3)));
  }
  $("#run-figures").replaceChildren(...figs);
  lossChart($("#loss-chart"), state.metrics);
  rewardChart($("#reward-chart"), state.metrics);
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log || "";
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function niceTicks(lo, hi, n = 5) {
  if (hi - lo < 1e-12) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

const metricPoints = (metrics, key) =>
  metrics.filter((m) => typeof m[key] === "number").map((m) => [m.step, m[key]]);

function lossChart(svg, metrics) {
  lineChart(svg, [
    { label: "train loss", cls: "train", pts: metricPoints(metrics, "train_loss") },
    { label: "validation loss", cls: "val", pts: metricPoints(metrics, "val_loss"), dots: true },
  ], "the loss curves appear here after the first step", false);
}

// DPO / ORPO runs log rewards/* per step (beta x log-ratio of chosen and rejected answers)
function rewardChart(svg, metrics) {
  const margins = metricPoints(metrics, "rewards/margins");
  svg.classList.toggle("hidden", !margins.length);
  if (!margins.length) { svg.replaceChildren(); return; }
  lineChart(svg, [
    { label: "chosen reward", cls: "val", pts: metricPoints(metrics, "rewards/chosen") },
    { label: "rejected reward", cls: "train", pts: metricPoints(metrics, "rewards/rejected") },
    { label: "margin", cls: "margin", pts: margins },
  ], "", true);
}

// series: [{label, cls, pts: [[step, value]], dots}]; signed false keeps the y axis >= 0
function lineChart(svg, series, emptyText, signed) {
  svg.replaceChildren();
  const W = 640, H = 260, L = 52, R = 14, T = 26, B = 34;
  const all = series.flatMap((s) => s.pts);
  if (!all.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, emptyText));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = (y1 - y0) * 0.08 || 0.1;
  y0 = signed ? y0 - pad : Math.max(0, y0 - pad); y1 += pad;
  const x = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const y = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - B - T);
  for (const t of niceTicks(y0, y1)) {
    if (t < y0 || t > y1) continue;
    svg.append(svgEl("line", { class: "gridline", x1: L, x2: W - R, y1: y(t), y2: y(t) }));
    svg.append(svgEl("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, String(+t.toPrecision(4))));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    svg.append(svgEl("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, String(t)));
  }
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  const path = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  let legendX = L + 8;
  for (const s of series) {
    if (s.pts.length) svg.append(svgEl("path", { class: s.cls, d: path(s.pts) }));
    if (s.dots || s.pts.length === 1) {
      for (const p of s.pts) svg.append(svgEl("circle", { class: `${s.cls}-dot`, cx: x(p[0]), cy: y(p[1]), r: 3.5 }));
    }
    svg.append(svgEl("rect", { class: `legend-${s.cls}`, x: legendX, y: 8, width: 14, height: 4 }));
    svg.append(svgEl("text", { x: legendX + 18, y: 14 }, s.label));
    legendX += 30 + 7 * s.label.length;
  }
}

async function stopRun() {
  try {
    await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/stop`);
  } catch (exc) {
    if (exc instanceof ApiError) showErrors($("#run-panel"), exc.errors);
  }
  clearTimeout(state.timers.run);
  pollRun();
}

async function resumeRun() {
  try {
    await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/resume`, { allow_parallel: value("allow_parallel") });
    clearErrors($("#run-panel"));
  } catch (exc) {
    if (exc instanceof ApiError) showErrors($("#run-panel"), exc.errors.map((e) => ({ ...e, field: e.field === "start" ? "run" : e.field })));
  }
  clearTimeout(state.timers.run);
  pollRun();
  refreshRuns();
}

// ------------------------------------------------------------------ compare

function fillCompareRuns() {
  const select = $("#compare_run");
  const current = select.value || state.compareRun || state.selected;
  const usable = state.runs.filter((r) => r.has_adapter || r.has_model);
  select.replaceChildren(...usable.map((r) => el("option", { value: r.name, text: `${r.name} (${r.method || "?"}, ${r.state})` })));
  if (!usable.length) select.append(el("option", { value: "", text: "no finished run yet" }));
  if (usable.some((r) => r.name === current)) select.value = current;
  state.compareRun = select.value || null;
}

async function startCompare() {
  const scope = $("#compare-form");
  const name = value("compare_run");
  if (!name) { showErrors(scope, [{ field: "run", message: "train a run first" }]); return; }
  const body = { limit: value("limit"), max_new_tokens: value("cmp_max_new_tokens"), few_shot: value("few_shot"),
    instruction: value("instruction"), forgetting: value("forgetting"), allow_parallel: value("allow_parallel") };
  try {
    await api("POST", `/api/runs/${encodeURIComponent(name)}/compare`, body);
    clearErrors(scope);
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    showErrors(scope, exc.errors);
    return;
  }
  refreshCompare();
}

async function refreshCompare() {
  clearTimeout(state.timers.compare);
  const name = state.compareRun = value("compare_run");
  if (!name) return;
  let c;
  try {
    c = await api("GET", `/api/runs/${encodeURIComponent(name)}/compare`);
  } catch (exc) {
    return;
  }
  if (name !== value("compare_run")) return;
  renderCompare(c);
  if (c.state === "running" || c.state === "stopping") state.timers.compare = setTimeout(refreshCompare, 1500);
  else refreshRuns();  // the header's job list, at once rather than at its next tick
}

function ciBar(score, lo, hi) {
  const bar = el("div", { class: "ci", title: `${fix(score, 3)} [${fix(lo, 3)}, ${fix(hi, 3)}]` });
  const range = el("div", { class: "range" });
  range.style.left = `${100 * (lo ?? score)}%`;
  range.style.width = `${Math.max(0.5, 100 * ((hi ?? score) - (lo ?? score)))}%`;
  const point = el("div", { class: "point" });
  point.style.left = `calc(${100 * score}% - 1px)`;
  bar.append(range, point);
  return bar;
}

const DECISIONS = { finetune: "Fine-tuning pays off", prompting_better: "Prompting is better",
  tradeoff: "A trade-off: the task gains, general ability is lost",
  prefer_prompting: "Prefer prompting", incomplete: "Not enough to decide" };
const KINDS = { zero_shot: "zero-shot", few_shot: "few-shot", finetuned: "fine-tuned" };

function renderCompare(c) {
  $("#compare-title").textContent = `Comparison of ${c.name}`;
  const badge = $("#compare-state");
  badge.textContent = c.state === "none" ? "not run yet" : c.state;
  badge.className = `badge ${c.state}`;
  const active = c.state === "running" || c.state === "stopping";
  $("#compare-stop").classList.toggle("hidden", !active);
  $("#compare-start").disabled = active;
  const link = $("#compare-report");
  link.classList.toggle("hidden", !c.has_report || active);
  link.href = `/runs/${encodeURIComponent(c.name)}/compare/report.html`;
  const runLink = $("#compare-run-report");
  const run = state.runs.find((r) => r.name === c.name);
  runLink.classList.toggle("hidden", !(run && run.has_report));
  runLink.href = `/runs/${encodeURIComponent(c.name)}/report.html`;
  const error = $("#compare-error");
  error.classList.toggle("hidden", !c.error);
  error.textContent = c.error || "";
  $("#compare-log").textContent = c.log || "";
  const verdict = $("#verdict");
  const table = $("#compare-table");
  const extra = $("#compare-extra");
  if (!c.report || active) {
    verdict.classList.add("hidden");
    table.replaceChildren();
    extra.replaceChildren(active ? el("p", { class: "muted", text: "Generating and scoring… the table appears when it is done." }) : "");
    return;
  }
  const r = c.report;
  const v = r.verdict || {};
  verdict.className = `verdict ${v.decision || "incomplete"}`;
  verdict.replaceChildren(el("div", { class: "decision", text: DECISIONS[v.decision] || v.decision }), el("div", { text: v.text || "" }));
  const metric = r.metric;
  const others = Object.keys((r.metric_table && Object.values(r.metric_table)[0]) || {}).filter((m) => m !== metric).slice(0, 4);
  const head = el("tr", {}, ...["system", "kind", `${metric} [95% interval]`, "", "general ability", ...others, "prompt tokens/req", "latency/req", "training time", "peak memory"]
    .map((h) => el("th", { text: h })));
  const forgot = new Set(v.forgot || []);
  const best = new Set([v.best_prompt, v.best_finetuned]);
  const rows = (r.systems || []).map((s) => el("tr", { class: best.has(s.name) ? "best" : "" },
    el("td", { text: s.name }), el("td", { text: KINDS[s.kind] || s.kind }),
    el("td", { class: "num", text: `${fix(s.score, 3)} [${fix(s.ci_low, 3)}, ${fix(s.ci_high, 3)}]` }),
    el("td", {}, ciBar(s.score, s.ci_low, s.ci_high)),
    el("td", { class: forgot.has(s.name) ? "num forgot" : "num", text: generalCell(r.general_ability, s) }),
    ...others.map((m) => el("td", { class: "num", text: fix((r.metric_table[s.name] || {})[m], 3) })),
    el("td", { class: "num", text: s.prompt_tokens ? s.prompt_tokens.toFixed(0) : "-" }),
    el("td", { class: "num", text: s.latency_s ? `${(s.latency_s * 1000).toFixed(0)} ms` : "-" }),
    el("td", { class: "num", text: s.train_time_s ? duration(s.train_time_s) : "-" }),
    el("td", { class: "num", text: s.peak_memory_bytes ? bytes(s.peak_memory_bytes) : "-" })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  const notes = [];
  if (r.forgetting && r.forgetting.text) notes.push(el("p", {}, el("b", { text: "Forgetting: " }), r.forgetting.text));
  if (forgot.size) {
    const retrain = el("button", { type: "button", class: "primary", id: "retrain-replay", text: "Retrain with replay" });
    retrain.addEventListener("click", () => busy(retrain, () => retrainWithReplay(c.name)));
    notes.push(el("p", {}, "The fine-tuned model lost general ability. Replay mixes the base model's own answers to general prompts into training (20% of each epoch) to keep it: ", retrain,
      el("span", { class: "err", id: "retrain-error" })));
  }
  for (const [name, flag] of Object.entries(r.overfitting || {})) notes.push(el("p", {}, el("b", { text: `Loss curves (${name}): ` }), flag.message || ""));
  if (c.examples && c.examples.length) {
    const cols = Object.keys(c.examples[0]).filter((k) => k !== "id");
    notes.push(el("h2", { text: "Examples" }), el("table", { class: "grid-table" },
      el("thead", {}, el("tr", {}, ...cols.map((k) => el("th", { text: k })))),
      el("tbody", {}, ...c.examples.slice(0, 5).map((row) => el("tr", {}, ...cols.map((k) => el("td", { text: String(row[k] ?? "") })))))));
  }
  extra.replaceChildren(...notes);
}

function generalCell(general, s) {
  // probe accuracy (and general-text perplexity) of this row against the base model
  if (!general || !general.base || s.kind !== "finetuned") return "-";
  const g = general[s.name];
  if (!g) return "-";
  const parts = [];
  if (g.probe_accuracy != null && general.base.probe_accuracy != null) parts.push(`probe ${fix(general.base.probe_accuracy, 2)} → ${fix(g.probe_accuracy, 2)}`);
  if (g.perplexity && general.base.perplexity) parts.push(`ppl ${((g.perplexity / general.base.perplexity - 1) * 100).toFixed(0)}%`);
  return parts.join(", ") || "-";
}

async function retrainWithReplay(name) {
  // the compared run's own settings, plus replay of the base model's answers
  const run = await api("GET", `/api/runs/${encodeURIComponent(name)}`);
  const config = {};
  for (const key of Object.keys(TRAIN_FIELDS)) if (run.config && run.config[key] != null) config[key] = run.config[key];
  Object.assign(config, { replay: "self", replay_ratio: 0.2 });
  try {
    const started = await api("POST", "/api/runs", { name: `${name}-replay`, config, allow_parallel: false });
    await refreshRuns();
    location.hash = "train";
    selectRun(started.name);
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    $("#retrain-error").textContent = exc.errors.map((e) => e.message).join("; ");
  }
}

async function stopCompare() {
  try {
    await api("POST", `/api/runs/${encodeURIComponent(value("compare_run"))}/compare/stop`);
  } catch (exc) {
    if (exc instanceof ApiError) showErrors($("#compare-form"), exc.errors);
  }
  refreshCompare();
}

// ------------------------------------------------------------------ chat

async function refreshChat() {
  if (!value("chat_model") && value("model")) $("#chat_model").value = value("model");
  let info;
  try { info = await api("GET", "/api/chat"); } catch (exc) { return; }
  const box = $("#chat-columns");
  const before = new Set($$("input", box).filter((i) => i.checked).map((i) => i.value));
  const fresh = !box.children.length;
  const ids = ["base", ...info.adapters.map((a) => a.name)];
  box.replaceChildren(...ids.map((id) => {
    const checked = fresh ? (id === "base" || id === info.adapters.map((a) => a.name).slice(-1)[0] || id === state.selected) : before.has(id);
    const label = id === "base" ? "base model" : `adapter ${id}`;
    return el("label", {}, el("input", { type: "checkbox", value: id, checked, name: "columns" }), label);
  }));
  $$("input", box).forEach((i) => i.addEventListener("change", renderPanes));
  renderPanes();
}

function chatColumns() {
  return $$("#chat-columns input").filter((i) => i.checked).map((i) => i.value);
}

function renderPanes() {
  const panes = chatColumns().map((id) => {
    const history = state.chat[id] || [];
    return el("div", { class: "pane", "data-model": id }, el("h3", { text: id === "base" ? `base: ${value("chat_model") || ""}` : `adapter: ${id}` }),
      ...history.map((m) => el("div", { class: `msg ${m.role}` }, m.content,
        m.stats ? el("span", { class: "stats", text: m.stats }) : null)));
  });
  $("#chat-panes").replaceChildren(...panes);
}

async function sendChat() {
  const scope = $("#chat-form");
  const text = $("#prompt").value;
  const ids = chatColumns();
  const columns = ids.map((id) => ({ model: id, messages: [...(state.chat[id] || []).map((m) => ({ role: m.role, content: m.content })), { role: "user", content: text }] }));
  const body = { model: value("chat_model"), columns, max_new_tokens: value("chat_max_new_tokens"), temperature: value("temperature") };
  try {
    const r = await api("POST", "/api/chat", body);
    clearErrors(scope);
    for (const reply of r.replies) {
      const history = state.chat[reply.model] || (state.chat[reply.model] = []);
      history.push({ role: "user", content: text });
      history.push({ role: "assistant", content: reply.text, stats: `${reply.completion_tokens} tokens · ${reply.seconds.toFixed(1)} s · ${reply.finish_reason}` });
    }
    $("#prompt").value = "";  // only once answered: a failed send keeps what was typed
    renderPanes();
  } catch (exc) {
    if (!(exc instanceof ApiError)) throw exc;
    showErrors(scope, exc.errors);
  }
}

// ------------------------------------------------------------------ start

function on(sel, event, fn) {
  $(sel).addEventListener(event, (ev) => {
    if (event === "submit") ev.preventDefault();
    Promise.resolve(fn(ev)).catch((exc) => {
      const form = ev.target.closest("form") || $("main");
      const slot = $('[data-err="form"]', form);
      if (slot) slot.textContent = String(exc && exc.message ? exc.message : exc);
    });
  });
}

async function init() {
  keepInputs();
  state.info = await api("GET", "/api/info");
  const info = state.info;
  $("#model-list").replaceChildren(...info.aliases.map((a) => el("option", { value: a })));
  if (!value("model")) $("#model").value = info.default_model;
  const gpu = $("#gpu");
  const savedGpu = localStorage.getItem(KEEP + "gpu");
  gpu.replaceChildren(...info.gpus.map((g) => el("option", { value: g, text: g === "cpu" ? "this CPU" : g })));
  gpu.value = savedGpu && info.gpus.includes(savedGpu) ? savedGpu : info.default_gpu;

  on("#data-form", "submit", (ev) => busy($("#inspect"), inspect));
  on("#upload", "change", async (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    try {
      await busy($("#inspect"), async () => { await uploadFile(file); await inspect(); });
    } catch (exc) {
      if (!(exc instanceof ApiError)) throw exc;
      showErrors($("#data-form"), exc.errors);
    }
  });
  on("#model", "change", () => { checkModel(); if (state.data) inspect(); });
  for (const id of Object.values(DATA_FIELDS)) {
    on(`#${id}`, "change", () => { if (state.data) debounce("inspect", 300, () => inspect()); });
  }
  on("#plan-form", "input", () => debounce("plan", 250, refreshPlan));
  on("#plan-form", "change", () => debounce("plan", 100, refreshPlan));
  on("#train-form", "submit", () => busy($("#start"), startRun));
  on("#train-form", "input", trainSummary);
  on("#stop", "click", () => busy($("#stop"), stopRun));
  on("#resume", "click", () => busy($("#resume"), resumeRun));
  on("#compare-form", "submit", () => busy($("#compare-start"), startCompare));
  on("#compare_run", "change", refreshCompare);
  on("#compare-stop", "click", stopCompare);
  on("#chat-form", "submit", () => busy($("#send"), sendChat));
  on("#chat-clear", "click", () => { state.chat = {}; renderPanes(); });
  on("#chat_model", "change", () => { state.chat = {}; renderPanes(); });
  on("#prompt", "keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("#chat-form").requestSubmit();
  });
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1) || "data");
  checkModel();
  refreshRuns();
  setInterval(refreshRuns, 4000);
}

document.addEventListener("DOMContentLoaded", () => {
  init().catch((exc) => {
    $("#activity").textContent = `the ui could not start: ${exc.message}`;
  });
});
