// The decoding panel: generates tokens one at a time on random inputs on the visitor's GPU
// (`Decoding`, algorithm.md §10) and plots tokens per second against the context length, FMA
// decoding (near blocks and every level's far list: O(m + p log n) keys per token) beside exact
// dense decoding over the same cache (every cached key per token). The softmax select passes
// its variants (softcap, sinks, window: docs/variants.md) to `Decoding` as its options take
// them; with a window both modes read a ring of the last L + 1 tokens.
import { Decoding } from "./pkg/multipole_attn_web.js";

const $ = (id) => document.getElementById(id);

/** N(0, 1)-ish values (sum of uniforms), enough for timing. */
function randomArray(len) {
  const a = new Float32Array(len);
  for (let i = 0; i < len; i++) a[i] = Math.random() + Math.random() + Math.random() - 1.5;
  return a;
}

/** Tokens per second of `steps` one-token steps in `mode` on `dec` (after one warm-up step). */
async function tokensPerSecond(dec, mode, steps, d) {
  const one = () => randomArray(d);
  await dec.step(one(), one(), one(), mode);
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) await dec.step(one(), one(), one(), mode);
  return steps / ((performance.now() - t0) / 1000);
}

function draw(points) {
  const canvas = $("decode-plot");
  const g = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 60, B = 40, T = 16, R = 16;
  g.clearRect(0, 0, W, H);
  if (!points.length) return;
  const xs = points.map((p) => Math.log2(p.context));
  const ys = points.flatMap((p) => [Math.log10(p.fma), Math.log10(p.dense)]);
  const [x0, x1] = [Math.min(...xs) - 0.5, Math.max(...xs) + 0.5];
  const [y0, y1] = [Math.floor(Math.min(...ys)), Math.ceil(Math.max(...ys))];
  const X = (c) => L + ((Math.log2(c) - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => H - B - ((Math.log10(v) - y0) / Math.max(1e-9, y1 - y0)) * (H - B - T);
  g.strokeStyle = "#999"; g.fillStyle = "#444"; g.font = "12px sans-serif";
  g.beginPath(); g.moveTo(L, T); g.lineTo(L, H - B); g.lineTo(W - R, H - B); g.stroke();
  for (let e = y0; e <= y1; e++) g.fillText(`${10 ** e}`, 4, Y(10 ** e) + 4);
  for (const p of points) g.fillText(`${p.context}`, X(p.context) - 14, H - B + 16);
  g.fillText("tokens per second against context length (log-log)", L + 8, T + 4);
  for (const [key, color] of [["fma", "#1f77b4"], ["dense", "#d62728"]]) {
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 2;
    g.beginPath();
    points.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, X(p.context), Y(p[key])));
    g.stroke();
    for (const p of points) g.fillRect(X(p.context) - 3, Y(p[key]) - 3, 6, 6);
    const last = points[points.length - 1];
    g.fillText(key === "fma" ? "FMA" : "dense", X(last.context) - 40, Y(last[key]) - 8);
  }
}

/** Wires the panel to `gpu` (a `Gpu`); the button stays disabled without one. */
export function setupDecodePanel(gpu) {
  const button = $("decode-run");
  const status = $("decode-status");
  const panel = $("decoding");
  button.disabled = false;
  button.addEventListener("click", async () => {
    button.disabled = true;
    panel.dataset.state = "running";
    const contexts = $("decode-contexts").value.split(",").map(Number);
    const steps = Number($("decode-steps").value);
    // The select's values are JSON of the options' softcap, sinks (one head) and window.
    const variants = JSON.parse($("decode-variants").value);
    const named = $("decode-variants").selectedOptions[0].textContent;
    const d = 64;
    const points = [];
    const rows = [];
    try {
      for (const context of contexts) {
        status.textContent = `context ${context}: filling the cache…`;
        const dec = new Decoding(gpu, { headDim: d, maxLen: context + 2 * steps + 2, maxChunk: 1, ...variants });
        await dec.extend(randomArray(context * d), randomArray(context * d), [context]);
        status.textContent = `context ${context}: generating ${steps} tokens with FMA, then dense…`;
        const fma = await tokensPerSecond(dec, "fma", steps, d);
        const dense = await tokensPerSecond(dec, "dense", steps, d);
        dec.free();
        points.push({ context, fma, dense });
        rows.push(`<tr><td>${context}</td><td>${fma.toFixed(1)}</td><td>${dense.toFixed(1)}</td><td>${(fma / dense).toFixed(1)}×</td></tr>`);
        $("decode-table").innerHTML =
          "<tr><th>context</th><th>FMA tokens/s</th><th>dense tokens/s</th><th>FMA / dense</th></tr>" + rows.join("");
        draw(points);
      }
      status.textContent = `Done: one head, d = ${d}, m = 64, p = 2, softmax ${named}; wall clock per token (upload, one submit, readback).`;
      panel.dataset.state = "done";
    } catch (e) {
      status.textContent = `Error: ${e.message ?? e}`;
      panel.dataset.state = "error";
    }
    button.disabled = false;
  });
}
