#!/usr/bin/env python3
"""The markdown report of scripts/gpu_bench.sh: one table of forward times (FMA fine and
coarse, our dense, torch's f32 and bf16 SDPA where measured) with the ratios the issues track,
the decoding table, the backward lines and the conformance summary. Standard library only.

Usage: python3 scripts/gpu_report.py RESULTS_DIR > report.md
"""
import csv
import json
import sys
from pathlib import Path


def rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ms(x):
    return "-" if x is None else f"{x:.2f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def main(out):
    out = Path(out)
    print("# multipole-attn on this GPU\n")
    info = out / "info.txt"
    if info.exists():
        first = [l for l in info.read_text().splitlines() if l.startswith("adapter")]
        print("Adapters: " + "; ".join(first) + "\n")
    doctor = out / "doctor.json"
    if doctor.exists():
        try:
            rep = json.loads(doctor.read_text())
            print("| adapter | backend | kernels | passed | failed | worst error |")
            print("|---|---|---|---|---|---|")
            for a in rep["adapters"]:
                if a.get("unsupported"):
                    print(f"| {a['adapter']} | {a['backend']} | not tested: {a['unsupported']} | | | |")
                    continue
                print(f"| {a['adapter']} | {a['backend']} | {a['kernels']} | {a['passed']} | "
                      f"{a['failed']} | {a['worst_error']} |")
            print()
        except (ValueError, KeyError) as e:
            print(f"(doctor.json unreadable: {e})\n")

    bench = rows(out / "bench.csv")
    torch = rows(out / "torch.csv")
    fwd = {}
    for r in bench:
        key = (int(r["n"]), r["causal"] == "true")
        try:
            fwd.setdefault(key, {})[r["method"]] = float(r["median_ms"])
        except ValueError:
            pass
    for r in torch:
        key = (int(r["n"]), r["causal"] == "True")
        fwd.setdefault(key, {})["torch-" + r["impl"]] = float(r["fwd_ms"])
    if fwd:
        print("## Forward, median ms (GPU timestamps where the adapter has them)\n")
        print("| n | causal | FMA fine | FMA coarse | dense f32 | torch f32 (efficient) | "
              "torch bf16 (flash) | FMA fine vs bf16 flash | dense vs torch f32 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (n, causal), m in sorted(fwd.items()):
            fine, coarse, dense = m.get("fma-fine"), m.get("fma-coarse"), m.get("dense")
            f32, bf16 = m.get("torch-efficient"), m.get("torch-flash")
            print(f"| {n} | {causal} | {ms(fine)} | {ms(coarse)} | {ms(dense)} | {ms(f32)} | "
                  f"{ms(bf16)} | {ratio(bf16, fine)} faster | {ratio(f32, dense)} of torch's speed |")
        print()
    bw = out / "backward.txt"
    if bw.exists():
        print("## Backward (examples/bench_backward)\n\n```text")
        print(bw.read_text().rstrip())
        print("```\n")
    dec = rows(out / "decode.csv")
    if dec:
        print("## Decoding, ms per step (one submit waited for)\n")
        print("| batch | chunk | context | FMA | dense | dense / FMA |")
        print("|---|---|---|---|---|---|")
        for r in dec:
            f, d = float(r["fma_ms_per_step"]), float(r["dense_ms_per_step"])
            print(f"| {r['batch']} | {r['chunk']} | {r['context']} | {f:.3f} | {d:.3f} | {ratio(d, f)} |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
