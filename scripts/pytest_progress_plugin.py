"""pytest plugin of scripts/pytest_resilient.py. With IK_PYTEST_PROGRESS_FILE set, it writes
the collected test ids (in run order) to that path + ".collected", before each test the
test's id to that path, so the test that killed the interpreter can be named, and after each
test one JSON line (id, outcome, message) to that path + ".results", so outcomes survive a
round that crashes or is cut (pytest's own reports are written only at a clean exit)."""

import json
import os


def pytest_collection_finish(session):
    progress = os.environ.get("IK_PYTEST_PROGRESS_FILE")
    if progress:
        with open(progress + ".collected", "w") as f:
            f.write("\n".join(item.nodeid for item in session.items))


def pytest_runtest_logstart(nodeid, location):
    progress = os.environ.get("IK_PYTEST_PROGRESS_FILE")
    if progress:
        with open(progress, "w") as f:
            f.write(nodeid)


def pytest_runtest_logreport(report):
    progress = os.environ.get("IK_PYTEST_PROGRESS_FILE")
    # One line per test: the call's outcome, or a setup/teardown phase that did not pass.
    if not progress or (report.when != "call" and report.passed):
        return
    outcome = report.outcome if report.when == "call" or not report.failed else "error"
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
    with open(progress + ".results", "a") as f:
        f.write(json.dumps({"id": report.nodeid, "outcome": outcome, "message": message[:400]}) + "\n")
