// The explorer page: asks the server (this linattn) to measure, polls the job, and draws
// what comes back with uPlot. No data is made up here: every figure is a record.
"use strict";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
const DEFAULT_METHODS = ["softmax", "linear", "performer", "window"];
const $ = (id) => document.getElementById(id);

let methodNames = [];
let currentJob = null;
let records = [];
const charts = {};

function seqFromSlider() { return 2 ** Number($("seq").value); }

function showSeq() {
  const n = seqFromSlider();
  $("seq-value").textContent = n >= 1024 ? `${n / 1024}k` : String(n);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function formatBytes(bytes) {
  if (bytes == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(value < 10 && unit > 0 ? 2 : 0)} ${units[unit]}`;
}

function chosenMethods() {
  return methodNames.filter((name) => $(`method-${name}`).checked);
}

// One uPlot chart per quantity, its x the lengths, one series per method.
function formatTokens(n) {
  if (n >= 1 << 20) return `${n / (1 << 20)}M`;
  if (n >= 1024) return `${n / 1024}k`;
  return String(n);
}

function drawChart(id, list, field, label, format = (v) => v.toPrecision(2)) {
  const methods = [...new Set(list.map((r) => r.method))];
  const lengths = [...new Set(list.map((r) => r.seq))].sort((a, b) => a - b);
  const data = [lengths];
  const series = [{ label: "tokens" }];
  methods.forEach((method, i) => {
    const byLength = new Map(list.filter((r) => r.method === method).map((r) => [r.seq, r[field]]));
    data.push(lengths.map((n) => (byLength.get(n) ?? null)));
    const fit = list.find((r) => r.method === method && r.time_exponent != null);
    const growth = field === "median_ms" && fit ? ` (∝ n^${fit.time_exponent.toFixed(2)})` : "";
    series.push({ label: method + growth, stroke: COLORS[i % COLORS.length], width: 2, points: { size: 6 }, spanGaps: true });
  });
  const element = $(id);
  if (charts[id]) { charts[id].destroy(); }
  element.dataset.points = String(data.slice(1).flat().filter((v) => v != null).length);
  charts[id] = new uPlot({
    width: Math.min(860, element.clientWidth || 860),
    height: 260,
    scales: { x: { time: false, distr: 3, log: 2 }, y: { distr: 3 } },
    axes: [
      { label: "sequence length (tokens)", values: (u, splits) => splits.map(formatTokens) },
      { label, size: 70, values: (u, splits) => splits.map((v) => (v == null ? "" : format(v))) },
    ],
    series,
  }, data, element);
}

function drawTable() {
  const body = $("results").querySelector("tbody");
  body.innerHTML = "";
  for (const r of records) {
    const row = document.createElement("tr");
    const cells = r.skipped
      ? [r.method, r.seq, `skipped: ${r.skipped}`, "", "", "", "", ""]
      : [r.method, r.seq, r.median_ms.toFixed(3), Math.round(r.tokens_per_s).toLocaleString(),
         formatBytes(r.extra_bytes), r.rel_err == null ? "–" : r.rel_err.toExponential(2),
         r.fraction_of_floor == null ? "–" : r.fraction_of_floor.toFixed(2),
         r.time_exponent == null ? "–" : `n^${r.time_exponent.toFixed(2)}`];
    cells.forEach((text) => { const cell = document.createElement("td"); cell.textContent = text; row.appendChild(cell); });
    body.appendChild(row);
  }
}

function redraw() {
  const measured = records.filter((r) => !r.skipped);
  drawChart("chart-time", measured, "median_ms", "median time (ms)");
  drawChart("chart-memory", measured, "extra_bytes", "extra memory", formatBytes);
  drawChart("chart-error", measured.filter((r) => r.rel_err != null), "rel_err", "‖o − o_exact‖ / ‖o_exact‖");
  drawTable();
}

async function poll(id) {
  if (id !== currentJob) return; // a newer sweep took over
  try {
    const job = await api(`/api/jobs/${id}`);
    if (id !== currentJob) return;
    records = job.records;
    $("progress").max = job.total;
    $("progress").value = job.done;
    const where = job.state === "queued" ? ` (${job.position} ahead)` : job.current ? `: ${job.current}` : "";
    $("status").textContent = `${job.state} ${job.done}/${job.total}${where}`;
    $("status").className = "";
    redraw();
    if (job.state === "queued" || job.state === "running") {
      setTimeout(() => poll(id), 400);
    } else {
      currentJob = null;
      $("measure").disabled = false;
      $("cancel").disabled = true;
    }
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
  }
}

async function measure() {
  const request = {
    methods: chosenMethods(),
    min_seq: Math.min(256, seqFromSlider()),
    max_seq: seqFromSlider(),
    heads: Number($("heads").value),
    dim: Number($("dim").value),
    causal: $("causal").checked,
    features: Number($("features").value),
    window: Number($("window").value),
    k_proj: Number($("k_proj").value),
    inputs: inputSource(),
  };
  try {
    const job = await api("/api/measure", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(request) });
    currentJob = job.id;
    $("measure").disabled = true;
    $("cancel").disabled = false;
    poll(job.id);
  } catch (error) {
    $("status").textContent = error.message;
    $("status").className = "error";
  }
}

async function cancel() {
  if (currentJob) await api(`/api/jobs/${currentJob}`, { method: "DELETE" });
}

// Weights as a heat map: white is 0, dark is the row's largest weight.
function drawMap(canvas, weights) {
  const n = weights.length;
  canvas.width = n; canvas.height = n;
  const context = canvas.getContext("2d");
  const image = context.createImageData(n, n);
  weights.forEach((row, i) => {
    const top = Math.max(...row.map(Math.abs)) || 1;
    row.forEach((w, j) => {
      const shade = 255 - Math.round(255 * Math.min(1, Math.abs(w) / top));
      const at = 4 * (i * n + j);
      image.data[at] = shade; image.data[at + 1] = shade; image.data[at + 2] = w < 0 ? 255 : shade; image.data[at + 3] = 255;
    });
  });
  context.putImageData(image, 0, 0);
}

async function drawMaps() {
  const grid = $("map-grid");
  grid.innerHTML = "";
  try {
    const response = await api("/api/maps", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({
      methods: chosenMethods(), seq: Number($("map-seq").value), dim: Number($("dim").value), causal: $("causal").checked,
      features: Number($("features").value), window: Math.min(Number($("window").value), Number($("map-seq").value)),
      k_proj: Math.min(Number($("k_proj").value), Number($("map-seq").value)),
      inputs: inputSource(),
    }) });
    const panels = [{ method: "exact softmax", weights: response.exact, rel_err: 0 }, ...response.maps];
    for (const panel of panels) {
      const figure = document.createElement("figure");
      const caption = document.createElement("figcaption");
      caption.textContent = panel.weights
        ? `${panel.method}${panel.rel_err ? ` — error ${panel.rel_err.toExponential(2)}` : ""}`
        : `${panel.method}: ${panel.note}`;
      if (panel.weights) { const canvas = document.createElement("canvas"); drawMap(canvas, panel.weights); figure.appendChild(canvas); }
      figure.appendChild(caption);
      grid.appendChild(figure);
    }
  } catch (error) {
    grid.textContent = error.message;
    grid.className = "error";
  }
}

const RECURRENT = ["softmax", "window", "linear", "performer", "cosformer", "hybrid"];

// One series per method over the context lengths its samples cover.
function drawDecodeChart(id, methods, field, label, format) {
  const contexts = [...new Set(methods.flatMap((m) => m.samples.map((s) => s.context)))].sort((a, b) => a - b);
  const data = [contexts];
  const series = [{ label: "context" }];
  methods.forEach((m, i) => {
    const byContext = new Map(m.samples.map((s) => [s.context, s[field]]));
    data.push(contexts.map((c) => byContext.get(c) ?? null));
    series.push({ label: `${m.method} (${m.summary.memory})`, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true });
  });
  const element = $(id);
  if (charts[id]) charts[id].destroy();
  element.dataset.points = String(data.slice(1).flat().filter((v) => v != null).length);
  charts[id] = new uPlot({
    width: Math.min(860, element.clientWidth || 860), height: 240,
    scales: { x: { time: false } },
    axes: [{ label: "context length (tokens)" }, { label, size: 70, values: (u, splits) => splits.map((v) => (v == null ? "" : format(v))) }],
    series,
  }, data, element);
}

async function runDecode() {
  const methods = chosenMethods().filter((name) => RECURRENT.includes(name));
  $("decode-status").textContent = "decoding ...";
  $("decode-status").className = "";
  try {
    const report = await api("/api/decode", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({
      methods: methods.length ? methods : ["softmax", "linear"],
      prompt_len: Number($("prompt-len").value), tokens: Number($("decode-tokens").value),
      heads: Number($("heads").value), dim: Number($("dim").value),
    }) });
    const decoded = report.methods.filter((m) => !m.skipped);
    drawDecodeChart("chart-step", decoded, "step_us", "step latency (µs)", (v) => v.toPrecision(3));
    drawDecodeChart("chart-state", decoded, "state_bytes", "state memory", formatBytes);
    $("decode-status").textContent = decoded.map((m) => `${m.method}: ${m.summary.median_step_us.toFixed(1)} µs/token, ${formatBytes(m.summary.state_bytes)}`).join(" · ");
  } catch (error) {
    $("decode-status").textContent = error.message;
    $("decode-status").className = "error";
  }
}

function inputSource() {
  return ["random", "uploaded", "model"].find((source) => $(`source-${source}`).checked);
}

async function upload(role) {
  const file = $(`file-${role}`).files[0];
  if (!file) return;
  $("inputs-status").textContent = `uploading ${role} ...`;
  try {
    const state = await api(`/api/inputs/${role}`, { method: "PUT", body: file });
    const shape = (s) => (s ? `[${s.join(", ")}]` : "—");
    $("inputs-status").textContent = `q ${shape(state.q)}, k ${shape(state.k)}, v ${shape(state.v)}: `
      + (state.ready ? "ready" : state.problem);
    $("inputs-status").className = state.ready || !state.problem.includes("fit") ? "" : "error";
    if (state.ready) $("source-uploaded").checked = true;
  } catch (error) {
    $("inputs-status").textContent = error.message;
    $("inputs-status").className = "error";
  }
}

async function start() {
  const info = await api("/api/info");
  methodNames = info.methods.map((m) => m.name);
  $("machine").textContent = `Measured here on ${info.device}: ${info.threads} threads, copy ${(info.copy_bytes_per_s / 1e9).toFixed(1)} GB/s, `
    + `f32 matmul ${(info.matmul_flops_per_s / 1e9).toFixed(0)} GFLOP/s. Every number on this page is measured on this machine by linattn; `
    + `a case may take ${info.case_seconds} s and hold ${formatBytes(info.memory_budget_bytes)} before it is stopped.`;
  const box = $("methods");
  const theory = $("theory").querySelector("tbody");
  for (const m of info.methods) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" id="method-${m.name}"> ${m.name}`;
    box.appendChild(label);
    $(`method-${m.name}`).checked = DEFAULT_METHODS.includes(m.name);
    const row = document.createElement("tr");
    [m.name, m.time, m.memory, m.what].forEach((text) => { const cell = document.createElement("td"); cell.textContent = text; row.appendChild(cell); });
    theory.appendChild(row);
  }
  $("seq").max = String(Math.log2(info.max_seq));
  $("seq").addEventListener("input", showSeq);
  // Letting go of the slider measures up to the new length (cached lengths return at
  // once); a sweep still running for an older position is cancelled.
  let settle = null;
  $("seq").addEventListener("change", () => {
    clearTimeout(settle);
    settle = setTimeout(async () => {
      if (currentJob) await cancel();
      measure();
    }, 300);
  });
  $("measure").addEventListener("click", measure);
  $("cancel").addEventListener("click", cancel);
  $("draw-maps").addEventListener("click", drawMaps);
  $("run-decode").addEventListener("click", runDecode);
  for (const role of ["q", "k", "v"]) $(`file-${role}`).addEventListener("change", () => upload(role));
  showSeq();
}

start();
