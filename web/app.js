// The demo page: runs FMA and dense attention through the wasm build of multipole-attn on
// WebGPU, and draws which keys one query sees at each level. All the algorithm (index maps,
// bands, per-level softmax mass, errors) comes from Rust through wasm-bindgen; this file only
// reads the form, times the calls and draws.
import init, { Gpu, makeInputs, compareOutputs, structure, levelMass } from "./pkg/multipole_attn_web.js";
import { setupDecodePanel } from "./decode_panel.js";
import { setupConformance } from "./conformance.js";
import { setupGridView, setupGridRun } from "./grid_panel.js";

const $ = (id) => document.getElementById(id);

// Level 0 (fine keys) then coarse levels 1, 2, ...
const COLORS = ["#d1495b", "#edae49", "#66a182", "#00798c", "#30638e", "#003d5b",
  "#6d597a", "#b56576", "#8d99ae", "#4a4e69", "#9a8c98", "#22223b"];
const color = (level) => COLORS[Math.min(level, COLORS.length - 1)];

const state = {
  gpu: null,
  // The last run: options, inputs, and what it measured; the picture uses its inputs for the
  // per-level mass while the form still shows its configuration.
  run: null,
};

function setState(s, message = "") {
  document.body.dataset.state = s;
  $("status").textContent = message;
}

/** The options object the Rust side reads (web/src/options.rs). */
function formOptions() {
  const o = {
    batch: 1,
    heads: Number($("heads").value),
    n: Number($("n").value),
    headDim: Number($("head_dim").value),
    m: Number($("m").value),
    p: Number($("p").value),
    causal: $("causal").checked,
    queries: $("queries").value,
  };
  return { ...o, ...formVariants(o.heads) };
}

/**
 * The softmax variants of the form (docs/variants.md), each left out when its field is empty:
 * `softcap` C, `sinks` (one logit per head: a comma list, or one value for every head) and
 * `window` [L, R] (R empty: 0). Values are passed as typed; Rust checks them (C > 0, one
 * finite sink per head, R = 0 when causal, whole L, R >= 0) and the page shows its error.
 */
function formVariants(heads) {
  const v = {};
  const text = (id) => $(id).value.trim();
  if (text("softcap") !== "") v.softcap = Number(text("softcap"));
  if (text("sinks") !== "") {
    const s = text("sinks").split(",").map((x) => Number(x.trim() === "" ? NaN : x));
    v.sinks = s.length === 1 ? Array(heads).fill(s[0]) : s;
  }
  if (text("window-left") !== "" || text("window-right") !== "") {
    v.window = [Number(text("window-left") || 0), Number(text("window-right") || 0)];
  }
  return v;
}

const VARIANTS = ["softcap", "sinks", "window"];
const hasVariants = (o) => VARIANTS.some((k) => o[k] !== undefined);
/** `o` without its softmax variants: the picture and the level mass are plain FMA's. */
const plainOptions = (o) => Object.fromEntries(Object.entries(o).filter(([k]) => !VARIANTS.includes(k)));

const describeVariants = (o) =>
  (o.softcap !== undefined ? `, softcap ${o.softcap}` : "") +
  (o.sinks !== undefined ? `, sinks [${o.sinks.join(", ")}]` : "") +
  (o.window !== undefined ? `, window [${o.window.join(", ")}]` : "");

const describe = (o) =>
  `n = ${o.n}, ${o.heads} head${o.heads > 1 ? "s" : ""}, head_dim ${o.headDim}, m = ${o.m}, p = ${o.p}, ${o.causal ? "causal" : "bidirectional"}, ${o.queries} queries${describeVariants(o)}`;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Median wall-clock milliseconds of `reps` awaited calls, and the last call's result. */
async function timed(reps, call) {
  const times = [];
  let out;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    out = await call();
    times.push(performance.now() - t0);
  }
  return { ms: median(times), out, reps };
}

const fmt = (x, digits = 3) => (x >= 100 ? x.toFixed(0) : x.toPrecision(digits));

function showNumber(id, value, text) {
  const el = $(id);
  el.dataset.value = String(value);
  el.textContent = text;
}

async function run(event) {
  event?.preventDefault();
  if (!state.gpu) return;
  const o = formOptions();
  const kind = $("inputs").value;
  $("run").disabled = true;
  try {
    setState("running", `Making inputs (${describe(o)}, ${kind})…`);
    const made = makeInputs(o, kind, 2310);
    // Each getter copies out of wasm memory: take the copies once, outside the timings.
    const x = { q: made.q, k: made.k, v: made.v };
    made.free();
    const plan = state.gpu.plan(o);
    // Build the pipelines on a small problem of the same head_dim and block size, so neither
    // timing below includes shader compilation.
    setState("running", "Compiling shaders…");
    const small = { ...o, heads: 1, n: Math.min(o.n, 4 * o.m) };
    if (o.sinks) small.sinks = o.sinks.slice(0, 1); // one sink per head
    const xs = makeInputs(small, kind, 1);
    await state.gpu.fma(xs.q, xs.k, xs.v, small);
    await state.gpu.dense(xs.q, xs.k, xs.v, small);
    xs.free();

    setState("running", "Running FMA on WebGPU…");
    await nextFrame();
    const fma = await timed(3, () => state.gpu.fma(x.q, x.k, x.v, o));
    setState("running", `FMA ${fmt(fma.ms)} ms. Running dense attention on WebGPU…`);
    await nextFrame();
    let dense = await timed(1, () => state.gpu.dense(x.q, x.k, x.v, o));
    if (dense.ms < 1500) {
      dense = await timed(3, () => state.gpu.dense(x.q, x.k, x.v, o));
    }
    const err = compareOutputs(fma.out, dense.out);
    const result = {
      options: o, kind, levels: plan.levels, dispatches: plan.dispatches,
      fmaMs: fma.ms, denseMs: dense.ms, speedup: dense.ms / fma.ms,
      relError: err.relError, maxAbsError: err.maxAbsError,
      fmaReps: fma.reps, denseReps: dense.reps,
    };
    state.run = { options: o, inputs: x, result };
    showResult(result);
    setQueryRange(o.n);
    drawStructure();
    setState("done", `Done: ${describe(o)}.`);
  } catch (e) {
    setState("error", `Error: ${e.message ?? e}`);
  } finally {
    $("run").disabled = false;
  }
}

function showResult(r) {
  showNumber("fma-ms", r.fmaMs, fmt(r.fmaMs));
  showNumber("dense-ms", r.denseMs, fmt(r.denseMs));
  showNumber("speedup", r.speedup, r.speedup.toFixed(r.speedup >= 10 ? 1 : 2));
  showNumber("rel-error", r.relError, r.relError.toExponential(1));
  $("result-config").textContent = `· ${describe(r.options)}, ${r.kind === "smooth" ? "smooth K, V" : "i.i.d. inputs"}`;
  $("result-notes").textContent =
    `${r.levels} coarse level${r.levels === 1 ? "" : "s"}, ${r.dispatches} dispatches in one submit. ` +
    (r.options.window ? "With a window FMA is its near field alone: exact windowed attention, equal to dense up to f32 rounding. " : "") +
    `Max abs error ${r.maxAbsError.toExponential(1)}. Times: median of ${r.fmaReps} (FMA) and ` +
    `${r.denseReps} (dense) runs, wall clock incl. upload and readback, shaders compiled beforehand. ` +
    (r.options.window ? "" : r.kind === "smooth"
      ? "Smooth keys and values have far-field structure for the coarse levels to summarise."
      : "i.i.d. keys and values have no far-field structure: FMA's worst case.");
  document.body.dataset.result = JSON.stringify(r);
}

const nextFrame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));

// ---------------------------------------------------------------------------------------------
// The picture.

function drawStructure() {
  const full = state.run?.options ?? formOptions();
  // The picture is plain FMA's: the bands and the per-level mass of the plain softmax (with a
  // softmax variant the mass is not shown, and a window has no coarse level at all).
  const variants = hasVariants(full);
  const o = plainOptions(full);
  const query = Math.min(Number($("query").value), o.n - 1);
  $("query-out").textContent = String(query);
  let s;
  try {
    s = structure(o, query);
  } catch (e) {
    $("structure-text").textContent = `(${e.message})`;
    return;
  }
  let mass = null;
  if (state.run && !variants) {
    mass = levelMass(state.run.inputs.q, state.run.inputs.k, state.run.inputs.v, o, 0, query);
  }
  paint(s, mass, o);
  const fine = s.bands.filter((b) => b.level === 0).reduce((a, b) => a + b.end - b.start, 0);
  const seen = o.causal ? query + 1 : o.n;
  $("structure-text").innerHTML =
    `Query <b>${query}</b> attends to <b>${s.keys}</b> keys: ${fine} fine keys and ` +
    `${s.keys - fine} coarse keys over ${s.levels.length - 1} level${s.levels.length === 2 ? "" : "s"}, ` +
    `instead of ${seen} for dense attention; together they cover ${o.causal ? "every past position" : "every position"} exactly once.` +
    (mass ? ` Head 0 puts <b>${(100 * mass.mass[0]).toFixed(1)}%</b> of its attention on the fine keys.` : "") +
    (variants
      ? ` The picture and these counts are plain FMA's: the variants (${describeVariants(full).slice(2)}) are not drawn` +
        (full.window ? `, and with a window FMA has no coarse level: it sees keys ${Math.max(0, query - full.window[0])}..=${Math.min(o.n - 1, query + full.window[1])} one by one.` : ".")
      : "");
}

// Layout of the picture, CSS pixels.
const LEFT = 130, RIGHT = 196, ROW = 30, HEAD = 30, AXIS = 30, GAP = 34;

/**
 * Draws the query's bands over token positions [t0, t1) in rows of `ROW` pixels from `y0`:
 * one row per level, the level's windows as ticks, the bands in the level's colour, the future
 * masked when causal, the query as a line. Returns the height used.
 */
function panel(g, s, o, W, y0, t0, t1, zoomed) {
  const rows = s.levels.length;
  const x = (t) => LEFT + ((t - t0) / (t1 - t0)) * W;
  const clipX = (t) => x(Math.min(Math.max(t, t0), t1));
  const h = ROW - 8;
  g.save();
  for (const lv of s.levels) {
    const y = y0 + lv.level * ROW + 4;
    g.fillStyle = "#f2f4f7";
    g.fillRect(LEFT, y, W, h);
    g.fillStyle = "#1d2433";
    g.textAlign = "right";
    const label = lv.level === 0 ? `fine · m = ${lv.window}` : `level ${lv.level} · w = ${lv.window}`;
    g.fillText(label, LEFT - 10, y + h / 2);
    // The level's windows, as ticks where they are far enough apart to see.
    const step = (lv.window / (t1 - t0)) * W;
    if (step >= 4) {
      g.strokeStyle = "#d0d5dd";
      g.lineWidth = 1;
      g.beginPath();
      for (let a = Math.ceil(t0 / lv.window); a * lv.window < t1; a++) {
        if (a === 0) continue;
        const xx = Math.round(x(a * lv.window)) + 0.5;
        g.moveTo(xx, y);
        g.lineTo(xx, y + h);
      }
      g.stroke();
    }
  }
  // The bands: one per near block at level 0, one per coarse key (sub-window) above it.
  for (const b of s.bands) {
    if (b.end <= t0 || b.start >= t1) continue;
    const y = y0 + b.level * ROW + 4;
    const x0 = clipX(b.start), x1 = clipX(b.end);
    const gap = x1 - x0 > 3 && b.end <= t1 ? 1 : 0;
    g.fillStyle = color(b.level);
    g.fillRect(x0, y, Math.max(1, x1 - x0 - gap), h);
    if (b.level === 0 && W / (t1 - t0) >= 3) {
      // Fine keys are seen one by one: show them where they are wide enough.
      g.strokeStyle = "rgba(255,255,255,0.55)";
      g.lineWidth = 1;
      g.beginPath();
      for (let t = Math.max(b.start + 1, Math.ceil(t0)); t < Math.min(b.end, t1); t++) {
        const xx = Math.round(x(t)) + 0.5;
        g.moveTo(xx, y);
        g.lineTo(xx, y + h);
      }
      g.stroke();
    }
  }
  const bodyH = rows * ROW;
  // Causal: the future is masked.
  if (o.causal && s.query + 1 < t1) {
    const xf = clipX(s.query + 1);
    g.fillStyle = "rgba(255,255,255,0.72)";
    g.fillRect(xf, y0 + 4, LEFT + W - xf, bodyH - 8);
    if (LEFT + W - xf > 110) {
      g.fillStyle = "#98a2b3";
      g.textAlign = "right";
      g.fillText("future: masked", LEFT + W, y0 - 12);
    }
  }
  // The query.
  const xq = Math.round(x(s.query + 0.5)) + 0.5;
  g.strokeStyle = "#1d2433";
  g.lineWidth = 1.5;
  g.beginPath();
  g.moveTo(xq, y0 - 4);
  g.lineTo(xq, y0 + bodyH);
  g.stroke();
  g.fillStyle = "#1d2433";
  g.beginPath();
  g.moveTo(xq - 5, y0 - 12);
  g.lineTo(xq + 5, y0 - 12);
  g.lineTo(xq, y0 - 4);
  g.fill();
  const onLeft = xq > LEFT + W * 0.5;
  g.textAlign = onLeft ? "right" : "left";
  g.fillText(`query ${s.query}`, xq + (onLeft ? -9 : 9), y0 - 12);
  // Token axis.
  const ya = y0 + bodyH + 6;
  g.strokeStyle = "#98a2b3";
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(LEFT, ya + 0.5);
  g.lineTo(LEFT + W, ya + 0.5);
  g.stroke();
  g.fillStyle = "#667085";
  g.textAlign = "center";
  for (let k = 0; k <= 4; k++) {
    const t = Math.round(t0 + (k / 4) * (t1 - t0));
    g.fillRect(Math.round(x(t)), ya, 1, 5);
    g.fillText(String(t), Math.min(Math.max(x(t), LEFT + 10), LEFT + W - 14), ya + 15);
  }
  g.textAlign = "right";
  g.fillText(zoomed ? "zoom, tokens →" : "token position →", LEFT - 10, ya + 15);
  g.restore();
  return bodyH + AXIS;
}

/** The zoomed range: the query's neighbourhood, 12 fine blocks wide, clipped to [0, n). */
function zoomRange(s, o) {
  const span = Math.min(s.n, 12 * o.m);
  let t0 = Math.max(0, Math.round(s.query - span / 2));
  t0 = Math.min(t0, s.n - span);
  return [t0, t0 + span];
}

function paint(s, mass, o) {
  const canvas = $("picture");
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 1000;
  const rows = s.levels.length;
  const zoom = s.n > 12 * o.m;
  const panelH = rows * ROW + AXIS;
  const cssH = HEAD + panelH + (zoom ? GAP + HEAD + panelH : 0);
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  canvas.style.height = `${cssH}px`;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  g.font = "12px system-ui, sans-serif";
  g.textBaseline = "middle";
  const W = cssW - LEFT - RIGHT;
  canvas.dataset.left = String(LEFT);
  canvas.dataset.width = String(W);
  canvas.dataset.panel = String(HEAD + panelH);

  panel(g, s, o, W, HEAD, 0, s.n, false);

  // Per-level softmax mass of the query (head 0), beside the full view.
  const mx = LEFT + W + 18, mw = RIGHT - 70;
  g.textAlign = "left";
  g.fillStyle = "#667085";
  g.fillText(mass ? "attention per level" : "attention: run first", mx, HEAD - 12);
  for (const lv of s.levels) {
    const y = HEAD + lv.level * ROW + 4;
    const h = ROW - 8;
    g.fillStyle = "#f2f4f7";
    g.fillRect(mx, y, mw, h);
    if (!mass) continue;
    const share = mass.mass[lv.level] ?? 0;
    g.fillStyle = color(lv.level);
    g.fillRect(mx, y, Math.max(share > 0 ? 1 : 0, share * mw), h);
    g.fillStyle = "#1d2433";
    g.fillText(`${(100 * share).toFixed(share >= 0.1 ? 0 : 1)}%`, mx + mw + 6, y + h / 2);
  }

  if (!zoom) return;
  // The neighbourhood of the query, magnified: fine keys one by one, sub-windows of m/p tokens.
  const [t0, t1] = zoomRange(s, o);
  const y1 = HEAD + panelH + GAP + HEAD;
  const xa = LEFT + (t0 / s.n) * W, xb = LEFT + (t1 / s.n) * W;
  const ya = HEAD + rows * ROW + 2;
  g.fillStyle = "rgba(29,36,51,0.08)";
  g.fillRect(xa, HEAD, Math.max(2, xb - xa), rows * ROW);
  g.strokeStyle = "#98a2b3";
  g.setLineDash([3, 3]);
  g.beginPath();
  g.moveTo(xa, ya);
  g.lineTo(LEFT, y1 - 18);
  g.moveTo(xb, ya);
  g.lineTo(LEFT + W, y1 - 18);
  g.stroke();
  g.setLineDash([]);
  panel(g, s, o, W, y1, t0, t1, true);
}

function pickQuery(event) {
  const canvas = $("picture");
  const rect = canvas.getBoundingClientRect();
  const left = Number(canvas.dataset.left), W = Number(canvas.dataset.width);
  const o = plainOptions(state.run?.options ?? formOptions());
  const n = o.n;
  const f = (event.clientX - rect.left - left) / W;
  let t;
  if (event.clientY - rect.top < Number(canvas.dataset.panel)) {
    t = Math.floor(f * n);
  } else {
    // The zoom panel: positions inside the magnified range.
    const s = structure(o, Math.min(Number($("query").value), n - 1));
    const [t0, t1] = zoomRange(s, o);
    t = Math.floor(t0 + f * (t1 - t0));
  }
  if (f >= 0 && f <= 1 && t >= 0 && t < n) {
    $("query").value = String(t);
    drawStructure();
  }
}

function configChanged() {
  // A new configuration: the picture follows the form; the mass needs a run with it.
  state.run = null;
  setQueryRange(formOptions().n);
  drawStructure();
}

/** Slider range 0..n-1; a query beyond it moves to the same place, proportionally. */
function setQueryRange(n) {
  const el = $("query");
  const old = Number(el.max) + 1;
  const q = Number(el.value);
  el.max = String(n - 1);
  if (old !== n) el.value = String(Math.min(n - 1, Math.floor((q / old) * n)));
}

function noWebGpu(reason) {
  const el = $("no-webgpu");
  el.hidden = false;
  el.innerHTML =
    "<b>This browser has no WebGPU, so the demo cannot run here.</b> " +
    "Try a recent Chrome, Edge or Safari with WebGPU enabled; the picture of the method below " +
    `still works.<br><span class="small">Reason: ${escapeHtml(reason)}</span>`;
  $("adapter").textContent = "No WebGPU adapter.";
  $("run").disabled = true;
  setState("no-webgpu", "");
}

async function main() {
  await init();
  $("config").addEventListener("submit", run);
  for (const id of ["n", "heads", "head_dim", "m", "p", "queries", "causal", "inputs",
    "softcap", "sinks", "window-left", "window-right"]) {
    $(id).addEventListener("change", configChanged);
  }
  $("query").addEventListener("input", drawStructure);
  $("picture").addEventListener("click", pickQuery);
  window.addEventListener("resize", drawStructure);
  drawStructure();
  setupGridView();

  if (!("gpu" in navigator)) {
    noWebGpu("navigator.gpu is missing (WebGPU is off, or the page is not served from a secure origin such as 127.0.0.1).");
    return;
  }
  try {
    state.gpu = await Gpu.create();
  } catch (e) {
    noWebGpu(e.message ?? String(e));
    return;
  }
  let name = state.gpu.adapter;
  try {
    // Browsers tell pages a little about the adapter through GPUAdapterInfo.
    const info = (await navigator.gpu.requestAdapter())?.info;
    const bits = [info?.vendor, info?.architecture, info?.description].filter(Boolean);
    if (bits.length) name = `${bits.join(" ")} (WebGPU)`;
  } catch { /* keep the library's description */ }
  $("adapter").innerHTML =
    `WebGPU adapter: <b>${escapeHtml(name)}</b> · up to ${state.gpu.maxWorkgroup} invocations per workgroup, ` +
    `${state.gpu.workgroupMemory / 1024} KiB workgroup memory`;
  $("run").disabled = false;
  setupDecodePanel(state.gpu);
  setupGridRun(state.gpu);
  setupConformance(state.gpu, name);
  setState("ready", "Ready. Choose a configuration and press Run.");
}

const escapeHtml = (s) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

main().catch((e) => setState("error", `Error: ${e.message ?? e}`));
