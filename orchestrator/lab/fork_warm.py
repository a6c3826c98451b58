"""Imported last by the cvmlab-fork server: what every forked test would measure alike.

The host probe (`orchestrator.host.probe.shared_probe`) of the QEMU a test runs by
default: each test's set-up reads the server's measurement instead of probing the
host again (0.4 s of Python per test under TCG in the lab). A test that names
another QEMU probes for it itself. Measured here, before any test is forked, so it
describes the host as the job found it. A probe that breaks here is left to the
tests, which measure again and report it.
"""

from __future__ import annotations

import contextlib

from orchestrator.host.probe import shared_probe
from orchestrator.scenario import default_qemu_binary

# The server's preload swallows only ImportError: anything else would stop every test.
with contextlib.suppress(Exception):
    shared_probe(default_qemu_binary()).json_text  # noqa: B018 (made once, for every test)
