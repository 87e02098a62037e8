"""pytest that survives a crashing test: rerun the rest after a segfault, within a time budget.

    python scripts/pytest_resilient.py NAME OUT_DIR SECONDS [pytest args ...]

A test that kills the interpreter (SIGSEGV in native code, an abort) would otherwise take
every later test's result with it, as happened on the first GPU run. Each round runs pytest
with the given arguments and the plugin scripts/pytest_progress_plugin.py, which writes the
id of the test about to run to a file. When a round dies of a signal, that test is recorded as
crashed and the next round deselects it and every test that already ran (collection order
is stable), so each test runs at most once. A round cut by the budget records the test
that was running.

Writes, in OUT_DIR: NAME.log (all rounds' output) and NAME-status.json: {"exit_codes": [...], "crashed": [ids], "cut_during": id or null,
"deselected_after_crash": n, "counts": {outcome: n}, "failed": [{"id", "outcome", "message"}]},
the counts and failures taken test by test, so a crashed or cut round keeps them.
Exit code: 0 when every test passed and nothing crashed; 124 when the budget cut the run
and every test that ran passed; else 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List


def main(argv: List[str]) -> int:
    name, out, seconds, pytest_args = argv[0], argv[1], float(argv[2]), argv[3:]
    deadline = time.monotonic() + seconds
    progress = os.path.join(out, f".{name}-progress")
    log_path = os.path.join(out, f"{name}.log")
    status = {"exit_codes": [], "crashed": [], "cut_during": None, "deselected_after_crash": 0}
    ids: List[str] = []  # the first round's collection, in run order
    done_before: List[str] = []  # tests that ran (or crashed) in earlier rounds
    scripts = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, IK_PYTEST_PROGRESS_FILE=progress,
               PYTHONPATH=os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")])))
    if os.path.exists(progress + ".results"):
        os.remove(progress + ".results")
    with open(log_path, "w") as log:
        for round_number in range(1, 1000):
            left = deadline - time.monotonic()
            if left < 5:
                status["cut_during"] = status["cut_during"] or "(budget spent before the next round)"
                break
            for stale in (progress, progress + ".collected"):
                if os.path.exists(stale):
                    os.remove(stale)
            deselect = [arg for test in done_before for arg in ("--deselect", test)]
            command = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-p", "pytest_progress_plugin",
                       *pytest_args, *deselect]
            log.write(f"=== round {round_number}: {len(done_before)} tests deselected (ran earlier)\n")
            log.flush()
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = 124
            log.write(f"=== round {round_number}: exit code {code}\n")
            log.flush()
            status["exit_codes"].append(code)
            current = open(progress).read().strip() if os.path.exists(progress) else None
            if round_number == 1 and os.path.exists(progress + ".collected"):
                ids = open(progress + ".collected").read().split("\n")
            if code == 124:
                status["cut_during"] = current
                break
            if code >= 0 and code < 128:
                break  # pytest finished: 0 passed, 1 failures, 5 nothing collected
            # Killed by a signal (negative code) or a shell-style 128 + signal.
            if current is None or current not in ids:
                break  # crashed outside any test: nothing to skip past
            status["crashed"].append(current)
            done_before = ids[: ids.index(current) + 1]
            status["deselected_after_crash"] = len(done_before)
            if len(done_before) == len(ids):
                break
    results = []
    if os.path.exists(progress + ".results"):
        results = [json.loads(line) for line in open(progress + ".results") if line.strip()]
    status["counts"] = {outcome: sum(r["outcome"] == outcome for r in results)
                        for outcome in ("passed", "failed", "error", "skipped")}
    status["failed"] = [r for r in results if r["outcome"] in ("failed", "error")]
    for stale in (progress, progress + ".collected", progress + ".results"):
        if os.path.exists(stale):
            os.remove(stale)
    with open(os.path.join(out, f"{name}-status.json"), "w") as f:
        json.dump(status, f, indent=1)
    print(f"{name}: exit codes {status['exit_codes']}, crashed {status['crashed']}, cut during {status['cut_during']}")
    broken = status["crashed"] or status["failed"]
    if status["cut_during"] is not None and not broken:
        return 124  # every test that ran passed
    return 0 if not broken and status["exit_codes"][-1:] == [0] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
