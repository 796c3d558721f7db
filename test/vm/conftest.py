"""
The VM tests reuse the integration tests' process helpers and fixtures.

They are never skipped: on a machine without QEMU, or without apt-get to
fetch the livecd's Debian parts (and no CPUSHARE_CACHE holding them), each
fails saying what to install (`make test` as root installs it all).
"""

import os
import shutil

import pytest

from test.integration.conftest import (  # noqa: F401  (fixtures and hooks)
    market, processes, pytest_runtest_makereport,
)


@pytest.fixture(autouse=True)
def _vmTools():
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (Debian: qemu-system-x86)")
    if shutil.which("apt-get") is None and not os.environ.get("CPUSHARE_CACHE"):
        missing.append("apt-get, or CPUSHARE_CACHE holding the livecd's Debian parts")
    if missing:
        pytest.fail("the VM tests need " + " and ".join(missing) + ": run `make test` as"
                    " root (tools/host-deps.sh installs QEMU)", pytrace=False)
