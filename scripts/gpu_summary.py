"""Summary of a scripts/gpu_check.sh run: test counts, failures, ptxas spills, benchmark table.

    python scripts/gpu_summary.py OUT_DIR [all|tests|bench]
"""

import glob
import importlib.util
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test steps of gpu_check.sh, as named to scripts/pytest_resilient.py.
TEST_STEPS = ("tests", "attention", "kvcache", "random")


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


def step_summary(out: str, name: str) -> list:
    """One test step: counts over its rounds, failures, the tests that crashed the interpreter,
    and the test running when the time limit cut the step."""
    status_path = os.path.join(out, f"{name}-status.json")
    if not os.path.exists(status_path):
        return [f"tests ({name}): did not run"]
    status = json.load(open(status_path))
    # Counted test by test by the progress plugin: complete even when a round crashed or was cut.
    tally = status["counts"]
    counts = {"tests": sum(tally.values()), "failures": tally["failed"], "errors": tally["error"],
              "skipped": tally["skipped"]}
    failures = [f"  {'FAIL' if r['outcome'] == 'failed' else 'ERROR'} {r['id']}: "
                f"{(r['message'].splitlines() or [''])[0][:200]}" for r in status["failed"]]
    lines = [f"tests ({name}): {counts['tests']} run, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped; pytest exit codes {status['exit_codes']}"]
    lines += failures
    lines += [f"  CRASHED (killed the interpreter; the tests before it in that round are only in {name}.log): "
              f"{test}" for test in status["crashed"]]
    if status.get("cut_during"):
        lines.append(f"  CUT by the time limit during {status['cut_during']}")
    return lines


def tests_summary(out: str) -> list:
    return [line for name in TEST_STEPS for line in step_summary(out, name)]


def ptxas_summary(out: str) -> list:
    path = os.path.join(out, "ptxas.txt")
    if not os.path.exists(path):
        return []
    text = open(path).read().splitlines()
    spills = [line for line in text if "spill" in line and not line.strip().startswith("0 bytes") and
              "0 bytes spill stores, 0 bytes spill loads" not in line]
    return [f"ptxas: {sum('Used' in line for line in text)} kernels reported, {len(spills)} lines with spills"] + \
        [f"  {line.strip()}" for line in spills[:10]]


def bench_document(out: str):
    """The benchmark's results document of the run, or None."""
    paths = sorted(path for path in glob.glob(os.path.join(out, "*.json")) if not path.endswith("-status.json"))
    return json.load(open(paths[-1])) if paths else None


def bench_summary(out: str) -> list:
    document = bench_document(out)
    if document is None:
        return [f"bench: no results json; {exit_code_note(os.path.join(out, 'bench.log'), 'bench')}"]
    ceilings = document.get("ceilings", {})
    lines = [f"bench: {document.get('gpu')} {document.get('date')} {document.get('versions')}",
             f"  ceilings: {ceilings}",
             f"  {'op':<24}{'provider':<20}{'ms':>9}{'graph':>9}{'GB/s|TF':>9}{'ceil':>6}{'max err':>10}  speedups"]
    for row in document["results"]:
        rate = row.get("gbps") or row.get("tflops")
        speedups = " ".join(f"{k}={v:.2f}" for k, v in sorted(row.get("speedup_vs", {}).items()))
        frac = row.get("frac_of_ceiling")
        graph = row.get("ms_graph")
        error = row.get("max_err")  # None: the row had no reference check (not: exact)
        lines.append(f"  {row['op']:<24}{row['provider']:<20}{row['ms']:>9.4f}"
                     f"{'-' if graph is None else f'{graph:.4f}':>9}{(rate or 0):>9.0f}"
                     f"{(frac or 0):>6.2f}{'-' if error is None else f'{error:.2e}':>10}  {speedups}")
    return lines


def _targets_module():
    """internlm_kernels/bench/targets.py, loaded from its file: the summary should not depend
    on the package importing."""
    spec = importlib.util.spec_from_file_location(
        "targets", os.path.join(REPO, "internlm_kernels", "bench", "targets.py"))
    targets = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = targets  # dataclasses look their module up there
    spec.loader.exec_module(targets)
    return targets


def targets_summary(out: str) -> list:
    """The CUDA kernels' targets against the run's rows (internlm_kernels/bench/targets.py)."""
    document = bench_document(out)
    if document is None:
        return []
    return ["targets (CUDA kernels; as called, graph replay in brackets):"] + \
        [f"  {line}" for line in _targets_module().target_lines(document)]


def auto_summary(out: str) -> list:
    """cuda against triton per benchmark case, and the backend "auto" tries first for it
    (internlm_kernels.backends, when the package imports here)."""
    document = bench_document(out)
    if document is None:
        return []
    try:
        sys.path.insert(0, REPO)
        from internlm_kernels.backends import auto_preference
    except Exception as error:  # the comparison stands without it
        auto_preference, note = None, f" (auto's orders unknown: the package did not import: {error})"
    else:
        note = ""
    finally:
        sys.path.remove(REPO)
    lines = _targets_module().auto_order_lines(document, auto_preference)
    return [f"cuda against triton, and auto's first choice{note}:"] + [f"  {line}" for line in lines]


def dispatch_summary(out: str) -> list:
    """The host-overhead benchmark's rows (pytest-benchmark's table: name, median, rounds)."""
    path = os.path.join(out, "dispatch.log")
    if not os.path.exists(path):
        return []
    text = open(path, errors="replace").read().splitlines()
    header = [line for line in text if line.startswith("Name (time in")]
    rows = [line for line in text if line.startswith("test_")]
    if not rows:
        return ["dispatch overhead: no results, see dispatch.log"]
    return ["dispatch overhead (host time per call, median; " + (header[0].split("(")[1].split(")")[0]
                                                              if header else "units in dispatch.log") + "):"] + \
        [f"  {line}" for line in rows]


def sanitize_summary(out: str) -> list:
    """compute-sanitizer's verdicts: its ERROR SUMMARY line and the run's exit code per tool."""
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "sanitize-*.log"))):
        text = open(path, errors="replace").read().splitlines()
        verdicts = [line.strip() for line in text if "ERROR SUMMARY" in line or "exit code" in line]
        lines.append(f"{os.path.basename(path)}: " + ("; ".join(verdicts[-2:]) or "no verdict (cut?)"))
    return lines


# Nsight Compute metrics shown per kernel (names as its details page prints them).
PROFILE_METRICS = (("Duration", "time"), ("DRAM Throughput", "DRAM"), ("Compute (SM) Throughput", "SM"),
                   ("Achieved Occupancy", "occupancy"), ("Theoretical Occupancy", "of theoretical"),
                   ("Registers Per Thread", "registers"))


def profile_summary(out: str) -> list:
    """One line per profiled kernel from ncu's details page (CSV): time, DRAM and SM
    throughput (% of peak), achieved / theoretical occupancy, registers."""
    import csv

    path = os.path.join(out, "profile-details.csv")
    if not os.path.exists(path):
        return ["profile: no ncu results, see profile.log"]
    kernels: dict = {}
    with open(path, newline="", errors="replace") as f:
        for row in csv.DictReader(line for line in f if line.startswith('"')):
            key = (row.get("ID"), row.get("Kernel Name", "?"))
            kernels.setdefault(key, {})[row.get("Metric Name")] = (row.get("Metric Value"), row.get("Metric Unit"))
    lines = [f"profile: {len(kernels)} kernels (ncu)"]
    for (kernel_id, name), metrics in kernels.items():
        # "void internlm_kernels::x_detail::kernel<T, ...>(params...)" -> "kernel<T, ...>"
        short = re.sub(r"\w+::", "", re.sub(r"^void |\(.*", "", name))[:90]
        values = [f"{label} {metrics[metric][0]}{'' if not metrics[metric][1] else ' ' + metrics[metric][1]}"
                  for metric, label in PROFILE_METRICS if metric in metrics]
        lines.append(f"  [{kernel_id}] {short}: " + ", ".join(values))
    return lines


def main(out: str, phase: str = "all") -> None:
    # Sections built from the run's files only; auto's orders, which import the package (torch
    # and the extension), come last and print after the rest has.
    sections = [ptxas_summary(out)]
    if phase == "sanitize":
        sections.append(sanitize_summary(out))
    elif phase == "profile":
        sections.append(profile_summary(out))
    elif phase != "bench":
        sections.insert(0, tests_summary(out))
        probe = os.path.join(out, "exception-probe.txt")
        if os.path.exists(probe):
            sections.insert(0, ["exception probe:"] + ["  " + line for line in open(probe).read().splitlines()])
    if phase in ("all", "bench"):
        sections.append(bench_summary(out))
        sections.append(targets_summary(out))
        sections.append(dispatch_summary(out))
    for section in sections:
        print("\n".join(section), flush=True)
    if phase not in ("all", "bench"):
        return
    try:
        auto = auto_summary(out)
        if auto:
            print("\n".join(auto), flush=True)
    finally:  # last, whatever happened above: often only the tail of the output is seen
        log = os.path.join(out, "bench.log")
        if os.path.exists(log) and re.search(r"bench exit code: (124|137)", open(log, errors="replace").read()):
            print("bench: cut by its time limit (the json keeps the cases measured so far); "
                  "`bash scripts/gpu_check.sh OUT bench` on the same machine runs the rest")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out", sys.argv[2] if len(sys.argv) > 2 else "all")
