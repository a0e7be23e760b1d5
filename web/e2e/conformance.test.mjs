// End-to-end test of the page's "Test this GPU": in headless Chromium (/usr/bin/chromium
// through playwright-core, WebGPU on SwiftShader) press the button, follow the progress line,
// and check the table and the copied JSON: the doctor's report document (same cases and bound
// as `multipole-attn doctor --json`), every case passed. Screenshot in results/. Needs web/pkg/
// (scripts/web.sh --build-only). Run: `cd web && npm test`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");
const RESULTS = join(WEB, "..", "results");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// platform.md: --enable-unsafe-webgpu gives headless Chromium a WebGPU adapter.
const FLAGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--enable-unsafe-webgpu"];
const SUITE_TIMEOUT_MS = 600_000;

let server;
let url;
let profile;

/** python3 -m http.server on a free port of 127.0.0.1. */
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

before(async () => {
  mkdirSync(RESULTS, { recursive: true });
  ({ process: server, url } = await serve());
  profile = mkdtempSync(join(tmpdir(), "fma-conf-"));
});

after(() => {
  server?.kill();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

test("Test this GPU runs the doctor suite and copies its JSON", { timeout: SUITE_TIMEOUT_MS + 60_000 }, async () => {
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS,
    viewport: { width: 1100, height: 1000 }, deviceScaleFactor: 1,
  });
  try {
    await ctx.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url });
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    await page.waitForFunction(() => document.body.dataset.state !== "loading", null, { timeout: 60_000 });
    assert.ok(await page.isEnabled("#conf-run"), `button enabled: ${await page.textContent("#status")}`);
    await page.click("#conf-run");
    // The progress line moves while the suite runs.
    await page.waitForFunction(() => /^case \d+\/\d+: /.test(document.getElementById("conf-progress").textContent),
      null, { timeout: SUITE_TIMEOUT_MS, polling: 100 });
    const progress = await page.textContent("#conf-progress");
    const t0 = Date.now();
    await page.waitForFunction(() => !["idle", "running"].includes(document.getElementById("test-gpu").dataset.state),
      null, { timeout: SUITE_TIMEOUT_MS, polling: 500 });
    const state = await page.$eval("#test-gpu", (s) => s.dataset.state);
    const status = await page.textContent("#conf-progress");
    console.log(`progress seen: ${progress}\n${status} (${((Date.now() - t0) / 1000).toFixed(0)} s after it)`);
    const json = await page.textContent("#conf-json");
    writeFileSync(join(RESULTS, "web-conformance.json"), json);
    const report = JSON.parse(json);
    const failed = report.adapters.flatMap((a) => a.results.filter((r) => !r.passed).map((r) => `${r.name}: ${r.max_err} ${r.error ?? ""}`));
    assert.equal(state, "passed", `${status}\n${failed.join("\n")}`);

    // The document doctor --json prints: same keys, the whole suite, one adapter (this one).
    assert.deepEqual(Object.keys(report), ["version", "cases", "atol", "rtol", "adapters"]);
    assert.equal(report.atol, 5e-5);
    assert.equal(report.adapters.length, 1);
    const a = report.adapters[0];
    assert.deepEqual(Object.keys(a), ["adapter", "backend", "device_type", "driver", "kernels",
      "passed", "failed", "worst_error", "seconds", "error", "unsupported", "results"]);
    assert.equal(a.backend, "BrowserWebGpu");
    assert.equal(a.kernels, "plain");
    assert.equal(a.results.length, report.cases);
    assert.equal(a.passed, report.cases);
    assert.ok(a.worst_error > 0 && a.worst_error < 5e-5, `worst error ${a.worst_error}`);

    // The table shows the same figures.
    const row = await page.$$eval("#conf-table tbody tr td", (tds) => tds.map((td) => td.textContent));
    console.log(`table: ${row.join(" | ")}`);
    assert.equal(row[1], "plain");
    assert.equal(Number(row[2]), report.cases);
    assert.equal(Number(row[3]), 0);

    // Copy: the clipboard then holds exactly the JSON.
    await page.click("#conf-copy");
    await page.waitForFunction(() => document.getElementById("conf-copied").textContent !== "", null, { timeout: 10_000 });
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.equal(copied, json);
    await page.screenshot({ path: join(RESULTS, "web-conformance.png"), fullPage: true });
    assert.deepEqual(errors, [], "no uncaught errors in the page");
  } finally {
    await ctx.close();
  }
});
