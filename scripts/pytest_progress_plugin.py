"""pytest plugin of scripts/pytest_resilient.py. With IK_PYTEST_PROGRESS_FILE set, it writes
the collected test ids (in run order) to that path + ".collected", and before each test
the test's id to that path, so the test that killed the interpreter can be named."""

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
