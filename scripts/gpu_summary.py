"""Summary of a scripts/gpu_check.sh run: test counts, failures, ptxas spills, benchmark table.

    python scripts/gpu_summary.py OUT_DIR
"""

import glob
import json
import os
import sys
import xml.etree.ElementTree as ElementTree


def tests_summary(out: str) -> list:
    paths = sorted(glob.glob(os.path.join(out, "junit*.xml")))
    if not paths:
        return ["tests: no junit*.xml (pytest did not finish: see tests*.log)"]
    lines = []
    for path in paths:
        root = ElementTree.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        lines.append(f"tests ({os.path.basename(path)}): {counts['tests']} run, {counts['failures']} failed, "
                     f"{counts['errors']} errors, {counts['skipped']} skipped")
        for case in suite.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                message = (problem.get("message") or "").splitlines()[0][:160] if problem.get("message") else ""
                lines.append(f"  FAIL {case.get('classname')}::{case.get('name')}: {message}")
    return lines


def ptxas_summary(out: str) -> list:
    path = os.path.join(out, "ptxas.txt")
    if not os.path.exists(path):
        return []
    text = open(path).read().splitlines()
    spills = [line for line in text if "spill" in line and not line.strip().startswith("0 bytes") and
              "0 bytes spill stores, 0 bytes spill loads" not in line]
    return [f"ptxas: {sum('Used' in line for line in text)} kernels reported, {len(spills)} lines with spills"] + \
        [f"  {line.strip()}" for line in spills[:10]]


def bench_summary(out: str) -> list:
    paths = sorted(glob.glob(os.path.join(out, "*.json")))
    if not paths:
        return ["bench: no results json (see bench.log)"]
    document = json.load(open(paths[-1]))
    ceilings = document.get("ceilings", {})
    lines = [f"bench: {document.get('gpu')} {document.get('date')} {document.get('versions')}",
             f"  ceilings: {ceilings}",
             f"  {'op':<24}{'provider':<15}{'ms':>9}{'GB/s|TF':>9}{'ceil':>6}{'max err':>10}  speedups"]
    for row in document["results"]:
        rate = row.get("gbps") or row.get("tflops")
        speedups = " ".join(f"{k}={v:.2f}" for k, v in sorted(row.get("speedup_vs", {}).items()))
        frac = row.get("frac_of_ceiling")
        lines.append(f"  {row['op']:<24}{row['provider']:<15}{row['ms']:>9.4f}{(rate or 0):>9.0f}"
                     f"{(frac or 0):>6.2f}{row.get('max_err') or 0:>10.2e}  {speedups}")
    return lines


def main(out: str) -> None:
    for section in (tests_summary(out), ptxas_summary(out), bench_summary(out)):
        print("\n".join(section))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
