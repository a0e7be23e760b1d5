// End-to-end test of the demo page, as a person would use it: serve web/ on 127.0.0.1, open it
// in headless Chromium (/usr/bin/chromium through playwright-core, WebGPU on SwiftShader), set a
// configuration, press Run, wait for the result, check the figures shown are sane, and save
// screenshots under results/ (the test's artefacts). Needs web/pkg/ (scripts/web.sh
// --build-only). Run: `cd web && npm test`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");
const RESULTS = join(WEB, "..", "results");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// platform.md: --enable-unsafe-webgpu is the flag that gives headless Chromium a WebGPU adapter.
const FLAGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const RUN_TIMEOUT_MS = 240_000;

let server;
let url;
const profiles = [];

/** python3 -m http.server on a free port of 127.0.0.1 (the README's way of serving web/). */
function serve() {
  return new Promise((resolve, reject) => {
    const p = spawn("python3", ["-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", WEB, "0"],
      { stdio: ["ignore", "pipe", "pipe"] });
    const timer = setTimeout(() => reject(new Error("http.server did not start in 20 s")), 20_000);
    p.stdout.on("data", (chunk) => {
      const m = /port (\d+)/.exec(String(chunk));
      if (m) {
        clearTimeout(timer);
        resolve({ process: p, url: `http://127.0.0.1:${m[1]}/` });
      }
    });
    p.on("exit", (code) => reject(new Error(`http.server exited with ${code}`)));
  });
}

async function browser(webgpu) {
  const profile = mkdtempSync(join(tmpdir(), "fma-e2e-"));
  profiles.push(profile);
  const args = webgpu ? [...FLAGS, "--enable-unsafe-webgpu"] : FLAGS;
  // A persistent context on a fresh directory: Chromium's --user-data-dir, new every launch.
  return chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args,
    viewport: { width: 1100, height: 1000 },
    deviceScaleFactor: 1,
  });
}

/** Waits until the page leaves the "loading"/"running" states; returns the state. */
async function settled(page, timeout) {
  await page.waitForFunction(
    () => !["loading", "running"].includes(document.body.dataset.state),
    null, { timeout, polling: 250 });
  return page.evaluate(() => document.body.dataset.state);
}

const value = (page, id) => page.$eval(`#${id}`, (el) => Number(el.dataset.value));

/**
 * Presses Run, waits, checks the figures; returns them. `exact`: FMA is exact here (a sliding
 * window: its near field alone), so its error against dense is f32 rounding; `mass`: the
 * picture shows the query's softmax mass per level (not with a softmax variant).
 */
async function runAndCheck(page, label, { exact = false, mass = true } = {}) {
  await page.click("#run");
  const s = await settled(page, RUN_TIMEOUT_MS);
  const status = await page.textContent("#status");
  assert.equal(s, "done", `${label}: page ended in state ${s}: ${status}`);
  const r = {
    fmaMs: await value(page, "fma-ms"),
    denseMs: await value(page, "dense-ms"),
    speedup: await value(page, "speedup"),
    relError: await value(page, "rel-error"),
    shown: {
      fma: await page.textContent("#fma-ms"),
      dense: await page.textContent("#dense-ms"),
      speedup: await page.textContent("#speedup"),
      error: await page.textContent("#rel-error"),
    },
    config: (await page.textContent("#result-config")).trim(),
    notes: (await page.textContent("#result-notes")).trim(),
    structure: (await page.textContent("#structure-text")).trim(),
  };
  console.log(`${label}: ${r.config}\n  FMA ${r.shown.fma} ms, dense ${r.shown.dense} ms, ` +
    `speed-up ${r.shown.speedup}x, error vs dense ${r.shown.error} (relative)\n  ${r.notes}\n  ${r.structure}`);
  assert.ok(r.fmaMs > 0 && Number.isFinite(r.fmaMs), `${label}: FMA time ${r.fmaMs}`);
  assert.ok(r.denseMs > 0 && Number.isFinite(r.denseMs), `${label}: dense time ${r.denseMs}`);
  assert.ok(Math.abs(r.speedup - r.denseMs / r.fmaMs) < 1e-9 * r.speedup, `${label}: speed-up ${r.speedup}`);
  // Smooth keys and values: FMA is an approximation, a few percent off dense attention (the
  // native demo measures ~2e-2); a broken pass would be off by O(1) or NaN.
  if (exact) {
    assert.ok(r.relError >= 0 && r.relError < 1e-5, `${label}: relative error ${r.relError}`);
  } else {
    assert.ok(r.relError > 0 && r.relError < 0.1, `${label}: relative error ${r.relError}`);
  }
  assert.match(r.structure, /attends to \d+ keys/);
  if (mass) assert.match(r.structure, /% of its attention on the fine keys/);
  return r;
}

/** Counts canvas pixels in the level colours: the bands were drawn. */
const paintedPixels = (page) => page.$eval("#picture", (c) => {
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
  return n;
});

before(async () => {
  mkdirSync(RESULTS, { recursive: true });
  ({ process: server, url } = await serve());
});

after(() => {
  server?.kill();
  for (const p of profiles) rmSync(p, { recursive: true, force: true });
});

test("default run, then a causal configuration, on WebGPU", { timeout: 3 * RUN_TIMEOUT_MS }, async () => {
  const ctx = await browser(true);
  try {
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    const s = await settled(page, 60_000);
    assert.equal(s, "ready", `page state ${s}: ${await page.textContent("#status")} ${await page.textContent("#no-webgpu")}`);
    console.log(await page.textContent("#adapter"));
    assert.ok(await paintedPixels(page) > 100, "the structure picture is drawn before any run");

    const defaults = await runAndCheck(page, "default run");
    assert.match(defaults.config, /n = 4096, 2 heads, head_dim 64, m = 64, p = 2, bidirectional/);
    await page.screenshot({ path: join(RESULTS, "web-demo.png"), fullPage: true });

    // A configuration set through the form, as a person would.
    await page.selectOption("#n", "2048");
    await page.selectOption("#heads", "1");
    await page.selectOption("#head_dim", "32");
    await page.selectOption("#m", "32");
    await page.selectOption("#p", "4");
    await page.check("#causal");
    const r = await runAndCheck(page, "causal run");
    assert.match(r.config, /n = 2048, 1 head, head_dim 32, m = 32, p = 4, causal/);
    // Choose a query by clicking the picture: the text follows it.
    const box = await page.locator("#picture").boundingBox();
    const { left, width } = await page.$eval("#picture", (c) => ({
      left: Number(c.dataset.left), width: Number(c.dataset.width) }));
    await page.mouse.click(box.x + left + 0.5 * width, box.y + 40);
    const q = Number(await page.textContent("#query-out"));
    assert.ok(Math.abs(q - 1024) <= 8, `clicked query ${q}`);
    assert.match(await page.textContent("#structure-text"), new RegExp(`Query ${q} attends`));
    await page.screenshot({ path: join(RESULTS, "web-demo-causal.png"), fullPage: true });
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await ctx.close();
  }
});

test("the softmax variants set on the form run, and a bad one is a plain error", { timeout: 4 * RUN_TIMEOUT_MS }, async () => {
  const ctx = await browser(true);
  try {
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    assert.equal(await settled(page, 60_000), "ready");
    await page.selectOption("#n", "1024");
    await page.selectOption("#heads", "2");
    await page.selectOption("#head_dim", "32");
    await page.selectOption("#m", "32");

    // Gemma 2's softcap with gpt-oss's sinks (one per head), bidirectional FMA.
    await page.fill("#softcap", "5");
    await page.fill("#sinks", "1.5, -0.5");
    const capped = await runAndCheck(page, "softcap + sinks run", { mass: false });
    assert.match(capped.config, /n = 1024, 2 heads, head_dim 32, m = 32, p = 2, bidirectional, fine queries, softcap 5, sinks \[1\.5, -0\.5\]/);
    assert.match(capped.structure, /the variants \(softcap 5, sinks \[1\.5, -0\.5\]\) are not drawn/);
    assert.match(capped.notes, /\d+ coarse levels?/);

    // A sliding window with the causal mask and one sink value for every head (gpt-oss's
    // window layers): FMA is its near field alone, exact windowed attention.
    await page.fill("#softcap", "");
    await page.fill("#sinks", "2");
    await page.fill("#window-left", "24");
    await page.check("#causal");
    const windowed = await runAndCheck(page, "window + sinks run", { exact: true, mass: false });
    assert.match(windowed.config, /causal, fine queries, sinks \[2, 2\], window \[24, 0\]/);
    assert.match(windowed.notes, /^0 coarse levels/);
    assert.match(windowed.notes, /near field alone/);
    assert.match(windowed.structure, /with a window FMA has no coarse level/);
    await page.screenshot({ path: join(RESULTS, "web-demo-variants.png"), fullPage: true });

    // A window wider than FMA's near field, then a window looking right under the causal mask:
    // the library's typed errors, shown in the status; the page runs again afterwards.
    await page.fill("#window-left", "100");
    await page.click("#run");
    assert.equal(await settled(page, RUN_TIMEOUT_MS), "error");
    const wide = await page.textContent("#status");
    console.log(`wide window: ${wide}`);
    assert.match(wide, /^Error: .*window/);
    await page.fill("#window-left", "8");
    await page.fill("#window-right", "3");
    await page.click("#run");
    assert.equal(await settled(page, RUN_TIMEOUT_MS), "error");
    const right = await page.textContent("#status");
    console.log(`window right under causal: ${right}`);
    assert.match(right, /invalid window = \(8, 3\): with the causal mask the window's right extent R must be 0/);

    // Clearing the fields turns the variants off: the plain run, with its per-level mass.
    for (const id of ["sinks", "window-left", "window-right"]) await page.fill(`#${id}`, "");
    const plain = await runAndCheck(page, "variants off again");
    assert.doesNotMatch(plain.config, /softcap|sinks|window/);
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await ctx.close();
  }
});

test("without WebGPU the page says so plainly", { timeout: 60_000 }, async () => {
  const ctx = await browser(false);
  try {
    const page = await ctx.newPage();
    await page.goto(url);
    const s = await settled(page, 30_000);
    assert.equal(s, "no-webgpu");
    const msg = await page.textContent("#no-webgpu");
    assert.ok(await page.isVisible("#no-webgpu"));
    assert.match(msg, /This browser has no WebGPU/);
    assert.ok(await page.isDisabled("#run"));
    assert.ok(await paintedPixels(page) > 100, "the picture of the method still works");
    console.log(`no WebGPU: ${msg}`);
    await page.screenshot({ path: join(RESULTS, "web-demo-no-webgpu.png"), fullPage: true });
  } finally {
    await ctx.close();
  }
});

test("the decoding panel generates tokens with FMA and dense", { timeout: RUN_TIMEOUT_MS }, async () => {
  const ctx = await browser(true);
  try {
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    assert.equal(await settled(page, 60_000), "ready");
    await page.selectOption("#decode-contexts", "256,1024");
    await page.selectOption("#decode-steps", "3");
    await page.click("#decode-run");
    await page.waitForFunction(() => !["idle", "running"].includes(document.getElementById("decoding").dataset.state),
      null, { timeout: RUN_TIMEOUT_MS, polling: 250 });
    const state = await page.$eval("#decoding", (el) => el.dataset.state);
    const status = await page.textContent("#decode-status");
    assert.equal(state, "done", `decoding panel: ${status}`);
    const rows = await page.$$eval("#decode-table tr", (trs) => trs.slice(1).map((tr) =>
      [...tr.querySelectorAll("td")].map((td) => parseFloat(td.textContent))));
    console.log(`decoding panel: ${JSON.stringify(rows)}`);
    assert.equal(rows.length, 2);
    for (const [context, fma, dense] of rows) {
      assert.ok(fma > 0 && dense > 0 && Number.isFinite(fma) && Number.isFinite(dense), `context ${context}`);
    }
    await page.screenshot({ path: join(RESULTS, "web-demo-decoding.png"), fullPage: true });
    // gpt-oss's softmax (a sink and a window of 64): the options reach the decoder, both
    // modes run over the ring.
    await page.selectOption("#decode-variants", { label: "sinks + window 64 (gpt-oss)" });
    await page.click("#decode-run");
    // Done with this run once its status names the variants (the first run's said "plain").
    await page.waitForFunction(() => document.getElementById("decode-status").textContent.includes("gpt-oss") ||
      document.getElementById("decoding").dataset.state === "error",
      null, { timeout: RUN_TIMEOUT_MS, polling: 250 });
    const windowed = await page.textContent("#decode-status");
    assert.equal(await page.$eval("#decoding", (el) => el.dataset.state), "done", `windowed: ${windowed}`);
    assert.match(windowed, /^Done/);
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await ctx.close();
  }
});

test("the 2D panel: clicking a pixel shows its cells, and 2D FMA runs against dense", { timeout: RUN_TIMEOUT_MS }, async () => {
  const ctx = await browser(true);
  try {
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    assert.equal(await settled(page, 60_000), "ready");
    await page.locator("#grid-view").scrollIntoViewIfNeeded();
    // Click pixel (y, x) = (5, 20) of the default 32 x 32 grid.
    const box = await page.locator("#grid-canvas").boundingBox();
    await page.mouse.click(box.x + (20.5 / 32) * box.width, box.y + (5.5 / 32) * box.height);
    const view = await page.$eval("#grid-view", (el) => ({ query: Number(el.dataset.query), keys: Number(el.dataset.keys) }));
    assert.equal(view.query, 5 * 32 + 20);
    // Cells 4 x 4, p = 2 on 32 x 32: the pixel's cell is (1, 5), its 3 x 3 fine cells are rows
    // 0..12, columns 16..28 (144 keys), plus coarse keys of levels 1 and 2; far fewer than
    // dense's 1024.
    assert.ok(view.keys > 144 && view.keys < 1024 / 2, `keys ${view.keys}`);
    const text = await page.textContent("#grid-text");
    assert.match(text, /Pixel \(5, 20\) attends to \d+ keys: ■ 144 at full resolution/);
    assert.match(text, /level 1: \d+ coarse keys \(cells 4 × 4\); ■ level 2: \d+ coarse keys \(cells 8 × 8\)/);
    // Every level's colour is on the canvas: the near pixels and the far cells of levels 1, 2.
    const colours = await page.$eval("#grid-canvas", (c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      const near = [0xd1, 0x49, 0x5b];
      let nearPx = 0, shaded = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i] === near[0] && d[i + 1] === near[1] && d[i + 2] === near[2]) nearPx++;
        else if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) shaded++;
      }
      return { nearPx, shaded };
    });
    assert.ok(colours.nearPx > 100 * 144 && colours.shaded > 1000, JSON.stringify(colours));

    for (const queries of ["fine", "coarse"]) {
      await page.selectOption("#grid-queries", queries);
      await page.click("#grid-run");
      await page.waitForFunction(() => !["idle", "running"].includes(document.getElementById("grid-view").dataset.state),
        null, { timeout: RUN_TIMEOUT_MS, polling: 250 });
      const state = await page.$eval("#grid-view", (el) => el.dataset.state);
      const status = await page.textContent("#grid-status");
      assert.equal(state, "done", `2D panel (${queries}): ${status}`);
      const num = (id) => page.$eval(`#${id}`, (el) => Number(el.dataset.value));
      const r = { fma: await num("grid-fma-ms"), dense: await num("grid-dense-ms"), err: await num("grid-error") };
      console.log(`2D panel, ${queries} queries: FMA ${r.fma} ms, dense ${r.dense} ms, relative error ${r.err}; ${status}`);
      assert.ok(r.fma > 0 && r.dense > 0 && Number.isFinite(r.fma) && Number.isFinite(r.dense), JSON.stringify(r));
      // An approximation of dense attention: off by some percent, not 0 (then nothing was
      // approximated) and not O(1) or NaN (a broken pass).
      assert.ok(r.err > 1e-4 && r.err < 0.5, `relative error ${r.err}`);
    }
    await page.locator("#grid-view").screenshot({ path: join(RESULTS, "web-demo-grid.png") });
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await ctx.close();
  }
});
