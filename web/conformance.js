// "Test this GPU": runs the conformance suite of `multipole-attn doctor` (same cases, same
// bounds; Gpu.conformance in web/src/conformance.rs) on the browser's WebGPU adapter, shows a
// progress line and then the table doctor prints, and copies the report as the JSON that
// `multipole-attn doctor --json` prints, so results from many GPUs and browsers compare.

const $ = (id) => document.getElementById(id);

const section = () => $("test-gpu");

function setConfState(s, message) {
  section().dataset.state = s;
  $("conf-progress").textContent = message;
}

/** One row of the table per adapter: adapter, kernels, passed, failed, worst error, time. */
function showTable(report) {
  const body = $("conf-table").querySelector("tbody");
  body.replaceChildren();
  for (const a of report.adapters) {
    const tr = document.createElement("tr");
    tr.dataset.failed = String(a.failed);
    const worst = a.worst_error === null ? "n/a" : a.worst_error.toExponential(2);
    for (const text of [a.adapter, a.kernels, a.passed, a.failed, worst, `${a.seconds.toFixed(1)} s`]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    body.append(tr);
  }
  $("conf-table").hidden = false;
  const failures = report.adapters.flatMap((a) => a.results.filter((r) => !r.passed));
  const list = $("conf-failures").querySelector("ul");
  list.replaceChildren(...failures.map((r) => {
    const li = document.createElement("li");
    const err = r.max_err === null ? "no result" : `max err ${r.max_err.toExponential(2)}`;
    li.textContent = `${r.name}: ${err}${r.error ? ` (${r.error})` : ""}`;
    return li;
  }));
  $("conf-failures").hidden = failures.length === 0;
}

/** Copies the JSON; where the clipboard is refused, shows it selected for a manual copy. */
async function copyJson() {
  const pre = $("conf-json");
  try {
    await navigator.clipboard.writeText(pre.textContent);
    $("conf-copied").textContent = "Copied.";
  } catch {
    pre.hidden = false;
    const range = document.createRange();
    range.selectNodeContents(pre);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("conf-copied").textContent = "The clipboard is not available here: the JSON is shown below, selected.";
  }
}

/** Wires the section to `gpu` (a Gpu from the wasm build); `adapterName` as the page shows it. */
export function setupConformance(gpu, adapterName) {
  $("conf-run").disabled = false;
  $("conf-copy").addEventListener("click", copyJson);
  $("conf-run").addEventListener("click", async () => {
    $("conf-run").disabled = true;
    $("conf-copy").disabled = true;
    $("conf-copied").textContent = "";
    setConfState("running", "Starting the suite (the first cases include compiling the shaders)…");
    try {
      const json = await gpu.conformance((p) => {
        const status = p.passed ? "ok" : "FAILED";
        setConfState("running", `case ${p.done}/${p.total}: ${p.name}: ${status} (${p.seconds.toFixed(2)} s)`);
      }, adapterName);
      const report = JSON.parse(json);
      $("conf-json").textContent = json;
      showTable(report);
      const a = report.adapters[0];
      setConfState(a.failed === 0 ? "passed" : "failed",
        a.failed === 0
          ? `All ${a.passed} cases passed in ${a.seconds.toFixed(1)} s: this GPU, driver and browser compute FMA correctly.`
          : `${a.failed} of ${report.cases} cases failed: please report the JSON.`);
      $("conf-copy").disabled = false;
    } catch (e) {
      setConfState("error", `Error: ${e.message ?? e}`);
    } finally {
      $("conf-run").disabled = false;
    }
  });
}
