// The 2D panel: tokens on an H x W image (2D FMA, algorithm.md §9). Clicking a pixel shows
// what it attends to, from the library's 2D geometry (`gridStructure`, Rust): its 3 x 3 fine
// cells at full resolution, and per coarse level the bands of its far cells (one coarse key
// each), whose cells double in side from level to level. A button runs 2D FMA and dense
// attention on the visitor's GPU and shows the error and the times. No geometry here: this file
// reads the form, draws rectangles and times calls.
import { makeInputs, compareOutputs, gridStructure } from "./pkg/multipole_attn_web.js";

const $ = (id) => document.getElementById(id);

// Level 0 (fine keys) then coarse levels 1, 2, ... (the colours of the 1D picture).
const COLORS = ["#d1495b", "#edae49", "#66a182", "#00798c", "#30638e", "#003d5b",
  "#6d597a", "#b56576", "#8d99ae", "#4a4e69"];
const color = (level) => COLORS[Math.min(level, COLORS.length - 1)];

const panel = { gpu: null, query: null };

/** The options object of the panel's form (web/src/options.rs): one head on a side x side grid. */
function gridOptions() {
  const side = Number($("grid-side").value);
  return {
    heads: 1, n: side * side, headDim: Number($("grid-head-dim").value),
    m: Number($("grid-cell").value), p: Number($("grid-p").value),
    queries: $("grid-queries").value, grid: [side, side],
  };
}

function setPanelState(s, message) {
  $("grid-view").dataset.state = s;
  $("grid-status").textContent = message;
}

/** Draws the grid and what pixel `query` sees; writes the summary line. */
function draw() {
  const o = gridOptions();
  const [h, w] = o.grid;
  if (panel.query === null || panel.query >= o.n) panel.query = Math.floor(h / 2) * w + Math.floor(w / 3);
  const canvas = $("grid-canvas");
  const g = canvas.getContext("2d");
  const size = canvas.width;
  const px = size / Math.max(h, w);
  g.clearRect(0, 0, size, size);
  g.fillStyle = "#f2f4f7";
  g.fillRect(0, 0, w * px, h * px);
  let s;
  try {
    s = gridStructure(o, panel.query);
  } catch (e) {
    $("grid-text").textContent = `(${e.message})`;
    return;
  }
  const rect = (r) => [r.x0 * px, r.y0 * px, (r.x1 - r.x0) * px, (r.y1 - r.y0) * px];
  // Far bands: shaded per level, a thin white gap so neighbouring coarse keys stay apart.
  for (const b of s.far) {
    g.fillStyle = color(b.level);
    g.globalAlpha = 0.55;
    const [x, y, ww, hh] = rect(b.rect);
    g.fillRect(x + 0.5, y + 0.5, ww - 1, hh - 1);
  }
  g.globalAlpha = 1;
  // Cell outlines of each far cell (its bands' union), in the level's colour.
  const cells = new Map();
  for (const b of s.far) {
    const key = `${b.level}:${b.cell}`;
    const r = cells.get(key) ?? { level: b.level, y0: Infinity, x0: Infinity, y1: 0, x1: 0 };
    r.y0 = Math.min(r.y0, b.rect.y0); r.x0 = Math.min(r.x0, b.rect.x0);
    r.y1 = Math.max(r.y1, b.rect.y1); r.x1 = Math.max(r.x1, b.rect.x1);
    cells.set(key, r);
  }
  g.lineWidth = 1.5;
  for (const r of cells.values()) {
    g.strokeStyle = color(r.level);
    const [x, y, ww, hh] = rect(r);
    g.strokeRect(x + 1, y + 1, ww - 2, hh - 2);
  }
  // Near field: every pixel at full resolution, one small square each.
  g.fillStyle = color(0);
  for (let y = s.near.y0; y < s.near.y1; y++) {
    for (let x = s.near.x0; x < s.near.x1; x++) g.fillRect(x * px + 0.5, y * px + 0.5, px - 1, px - 1);
  }
  // The query pixel.
  const qy = Math.floor(panel.query / w), qx = panel.query % w;
  g.fillStyle = "#1d2433";
  g.fillRect(qx * px, qy * px, px, px);
  canvas.dataset.px = String(px);

  const fine = (s.near.y1 - s.near.y0) * (s.near.x1 - s.near.x0);
  const perLevel = s.levels.slice(1).map((lv) => {
    const k = s.far.filter((b) => b.level === lv.level).length;
    return `<span style="color:${color(lv.level)}">■</span> level ${lv.level}: ${k} coarse keys (cells ${lv.side} × ${lv.side})`;
  });
  $("grid-text").innerHTML =
    `Pixel <b>(${qy}, ${qx})</b> attends to <b>${s.keys}</b> keys: ` +
    `<span style="color:${color(0)}">■</span> ${fine} at full resolution (its 3 × 3 cells of ${s.levels[0].side} × ${s.levels[0].side})` +
    (perLevel.length ? `; ${perLevel.join("; ")}` : "") +
    `; dense attention: ${o.n}.`;
  $("grid-view").dataset.query = String(panel.query);
  $("grid-view").dataset.keys = String(s.keys);
}

function pick(event) {
  const canvas = $("grid-canvas");
  const box = canvas.getBoundingClientRect();
  const [h, w] = gridOptions().grid;
  // Canvas pixels per CSS pixel, then grid pixels.
  const scale = canvas.width / box.width;
  const px = Number(canvas.dataset.px);
  const x = Math.floor(((event.clientX - box.left) * scale) / px);
  const y = Math.floor(((event.clientY - box.top) * scale) / px);
  if (x >= 0 && x < w && y >= 0 && y < h) {
    panel.query = y * w + x;
    draw();
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function timed(reps, call) {
  const times = [];
  let out;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    out = await call();
    times.push(performance.now() - t0);
  }
  return { ms: median(times), out };
}

const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toPrecision(3));

function show(id, value, text) {
  $(id).dataset.value = String(value);
  $(id).textContent = text;
}

async function run() {
  const gpu = panel.gpu;
  if (!gpu) return;
  const o = gridOptions();
  $("grid-run").disabled = true;
  try {
    setPanelState("running", `Running 2D FMA and dense attention on a ${o.grid[0]} × ${o.grid[1]} grid…`);
    const made = makeInputs(o, $("grid-inputs").value, 7);
    const x = { q: made.q, k: made.k, v: made.v };
    made.free();
    // The first call of each compiles its shaders: a warm-up, not timed.
    await gpu.fma(x.q, x.k, x.v, o);
    await gpu.dense(x.q, x.k, x.v, o);
    const fma = await timed(3, () => gpu.fma(x.q, x.k, x.v, o));
    const dense = await timed(3, () => gpu.dense(x.q, x.k, x.v, o));
    const err = compareOutputs(fma.out, dense.out);
    show("grid-fma-ms", fma.ms, fmt(fma.ms));
    show("grid-dense-ms", dense.ms, fmt(dense.ms));
    show("grid-error", err.relError, err.relError.toExponential(1));
    setPanelState("done",
      `Done: ${o.grid[0]} × ${o.grid[1]} tokens, head_dim ${o.headDim}, cells ${o.m} × ${o.m}, p = ${o.p}, ` +
      `${o.queries} queries. Max abs error ${err.maxAbsError.toExponential(1)}; times: median of 3, wall clock ` +
      "incl. upload and readback, shaders compiled beforehand." +
      (o.queries === "coarse"
        ? " Coarse queries pool the queries like the keys: these inputs' queries are i.i.d., so the error is larger than with fine queries."
        : ""));
  } catch (e) {
    setPanelState("error", `Error: ${e.message ?? e}`);
  } finally {
    $("grid-run").disabled = false;
  }
}

/** Draws the panel (no GPU needed) and wires its form; `setupGridRun` enables the button. */
export function setupGridView() {
  for (const id of ["grid-side", "grid-cell", "grid-p", "grid-queries", "grid-head-dim", "grid-inputs"]) {
    $(id).addEventListener("change", () => {
      for (const f of ["grid-fma-ms", "grid-dense-ms", "grid-error"]) show(f, "", "–");
      draw();
    });
  }
  $("grid-canvas").addEventListener("click", pick);
  $("grid-run").addEventListener("click", run);
  draw();
}

/** The visitor's GPU is ready: the button runs 2D FMA against dense on it. */
export function setupGridRun(gpu) {
  panel.gpu = gpu;
  $("grid-run").disabled = false;
  setPanelState("idle", "");
}
