#!/usr/bin/env python3
"""Checks `multipole-attn doctor --json`'s report and prints it as doctor's table.

usage: check_doctor_json.py REPORT.json STDERR.txt BACKEND[,BACKEND...]

The report must be the document the page's "Test this GPU" also produces (web/e2e checks the
browser's): the suite's size and bound, one entry per adapter with every case, and every case
passed; each named backend must be there; the run's stderr must have no line saying "error".
An adapter that cannot run compute passes ("unsupported": why) has no cases and is listed as
not tested; it does not count for its backend.
"""
import json
import sys

ADAPTER_KEYS = ["adapter", "backend", "device_type", "driver", "kernels", "passed", "failed",
                "worst_error", "seconds", "error", "unsupported", "results"]
CASE_KEYS = ["name", "passed", "max_err", "seconds", "error"]


def main(report_path, stderr_path, backends):
    with open(report_path) as f:
        report = json.load(f)
    assert list(report) == ["version", "cases", "atol", "rtol", "adapters"], list(report)
    assert report["cases"] > 40 and report["atol"] == 5e-5 and report["rtol"] == 5e-5, report
    found = []
    print(f"{'adapter':<36} {'backend':<8} {'kernels':<11} {'passed':>6} {'failed':>6} "
          f"{'worst err':>10} {'time':>8}")
    for a in report["adapters"]:
        assert list(a) == ADAPTER_KEYS, list(a)
        if a["unsupported"] is not None:
            assert not a["results"] and a["passed"] == a["failed"] == 0, a["adapter"]
            print(f"{a['adapter']:<36} {a['backend']:<8} not tested: {a['unsupported']}")
            continue
        assert len(a["results"]) == report["cases"], (a["adapter"], len(a["results"]))
        for r in a["results"]:
            assert list(r) == CASE_KEYS, list(r)
        assert a["passed"] == sum(r["passed"] for r in a["results"]), a["adapter"]
        assert a["passed"] + a["failed"] == report["cases"], a["adapter"]
        worst = "n/a" if a["worst_error"] is None else f"{a['worst_error']:.2e}"
        print(f"{a['adapter']:<36} {a['backend']:<8} {a['kernels']:<11} {a['passed']:>6} "
              f"{a['failed']:>6} {worst:>10} {a['seconds']:>7.1f}s")
        failed = [r for r in a["results"] if not r["passed"]]
        for r in failed:
            print(f"   FAIL {r['name']}: max err {r['max_err']} {r['error'] or ''}")
        assert not failed and a["error"] is None, f"{a['adapter']} ({a['backend']}) failed"
        found.append(a["backend"].lower())
    for b in backends.split(","):
        assert b in found, f"no adapter on {b} in the report (found {found})"
    with open(stderr_path) as f:
        alarming = [line for line in f if "error" in line.lower()]
    assert not alarming, f"doctor printed on stderr: {alarming}"
    print(f"doctor --json: {len(found)} adapters, {report['cases']} cases each, all passed")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
