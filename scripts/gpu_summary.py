"""Summary of a scripts/gpu_check.sh run: test counts, failures, ptxas spills, benchmark table.

    python scripts/gpu_summary.py OUT_DIR [all|tests|bench]
"""

import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ElementTree

# The test steps of gpu_check.sh: their junit file and their log.
TEST_STEPS = (("junit.xml", "tests.log"), ("junit-attention.xml", "tests-attention.log"))


def exit_code_note(log_path: str, label: str) -> str:
    """Why a step left no results: the exit code its log ends with (124: cut by its time limit)."""
    if not os.path.exists(log_path):
        return "did not run"
    codes = re.findall(rf"{label} exit code: (\d+)", open(log_path, errors="replace").read())
    if not codes:
        return f"did not finish (no exit code in {os.path.basename(log_path)})"
    code = int(codes[-1])
    reason = " (cut by its time limit)" if code in (124, 137) else ""
    return f"did not finish: exit code {code}{reason}, see {os.path.basename(log_path)}"


def tests_summary(out: str) -> list:
    paths = []
    lines = []
    for junit, log in TEST_STEPS:
        path = os.path.join(out, junit)
        if os.path.exists(path):
            paths.append(path)
        else:
            lines.append(f"tests ({junit}): {exit_code_note(os.path.join(out, log), 'pytest')}")
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
        return [f"bench: no results json; {exit_code_note(os.path.join(out, 'bench.log'), 'bench')}"]
    document = json.load(open(paths[-1]))
    ceilings = document.get("ceilings", {})
    lines = [f"bench: {document.get('gpu')} {document.get('date')} {document.get('versions')}",
             f"  ceilings: {ceilings}",
             f"  {'op':<24}{'provider':<20}{'ms':>9}{'GB/s|TF':>9}{'ceil':>6}{'max err':>10}  speedups"]
    for row in document["results"]:
        rate = row.get("gbps") or row.get("tflops")
        speedups = " ".join(f"{k}={v:.2f}" for k, v in sorted(row.get("speedup_vs", {}).items()))
        frac = row.get("frac_of_ceiling")
        lines.append(f"  {row['op']:<24}{row['provider']:<20}{row['ms']:>9.4f}{(rate or 0):>9.0f}"
                     f"{(frac or 0):>6.2f}{row.get('max_err') or 0:>10.2e}  {speedups}")
    return lines


def main(out: str, phase: str = "all") -> None:
    sections = [ptxas_summary(out)]
    if phase != "bench":
        sections.insert(0, tests_summary(out))
    if phase != "tests":
        sections.append(bench_summary(out))
        log = os.path.join(out, "bench.log")
        if os.path.exists(log) and re.search(r"bench exit code: (124|137)", open(log, errors="replace").read()):
            sections.append(["bench: cut by its time limit (the json keeps the cases measured so far); "
                             "`bash scripts/gpu_check.sh OUT bench` on the same machine runs the rest"])
    for section in sections:
        print("\n".join(section))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out", sys.argv[2] if len(sys.argv) > 2 else "all")
