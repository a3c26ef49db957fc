"""Fuzz-suite plumbing: a per-test hang guard and the session's call count in the summary."""
import faulthandler
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from tests.fuzz.strategies import COUNTS, HANG_SECONDS, PROFILE

# hypothesis keeps its files (failure patches, caches) out of the repository
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "genflow-fuzz-hypothesis")


@pytest.fixture(autouse=True)
def _hang_guard():
    """A test running past HANG_SECONDS dumps every thread's stack and exits the process, so a
    hang fails the run instead of blocking it."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def pytest_terminal_summary(terminalreporter):
    total = COUNTS["valid"] + COUNTS["invalid"]
    if total:
        terminalreporter.write_line(f"genflow fuzz: {total} calls ({COUNTS['valid']} valid, "
                                    f"{COUNTS['invalid']} invalid), profile {PROFILE!r}")
