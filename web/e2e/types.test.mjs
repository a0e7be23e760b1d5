// The README's "use it from your own page or bundler" example, type-checked against the
// declarations wasm-bindgen wrote into web/pkg/ (tsc --strict, as a TypeScript user's build
// would), plus a negative control: the same example with an option of the wrong type must fail,
// so the declarations really constrain it. Needs web/pkg/ (scripts/web.sh --build-only).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");
const TSC = join(WEB, "node_modules", "typescript", "bin", "tsc");

/** The first ```ts block after the README heading "Use it from your own page or bundler". */
function readmeExample() {
  const readme = readFileSync(join(WEB, "..", "README.md"), "utf8");
  const at = readme.indexOf("### Use it from your own page or bundler");
  assert.ok(at >= 0, "README has the section");
  const m = /```ts\n([\s\S]*?)```/.exec(readme.slice(at));
  assert.ok(m, "the section has a ```ts block");
  return m[1];
}

/** tsc --noEmit --strict over `source`, importing "multipole-attn-web" from web/pkg/. */
function typecheck(source) {
  const dir = mkdtempSync(join(WEB, ".typecheck-"));
  try {
    writeFileSync(join(dir, "example.ts"), source);
    writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({
      compilerOptions: {
        strict: true, noEmit: true, target: "ES2022", module: "ESNext",
        moduleResolution: "bundler", lib: ["ES2022", "ESNext.Disposable", "DOM"], types: [],
        paths: { "multipole-attn-web": ["../pkg/multipole_attn_web.d.ts"] },
      },
      files: ["example.ts"],
    }));
    const r = spawnSync(process.execPath, [TSC, "-p", dir], { encoding: "utf8" });
    return { code: r.status, out: `${r.stdout}${r.stderr}` };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("the README example type-checks against web/pkg's declarations", { timeout: 120_000 }, () => {
  const example = readmeExample();
  assert.match(example, /from "multipole-attn-web"/);
  const ok = typecheck(example);
  assert.equal(ok.code, 0, ok.out);
  const bad = typecheck(example.replace("headDim: 64", 'headDim: "64"'));
  assert.notEqual(bad.code, 0, "a string headDim must not type-check");
  assert.match(bad.out, /TS2322/);
  const badWindow = typecheck(example.replace("window: [63, 0]", "window: 63"));
  assert.notEqual(badWindow.code, 0, "a window that is not [L, R] must not type-check");
  assert.match(badWindow.out, /TS2322/);
});
