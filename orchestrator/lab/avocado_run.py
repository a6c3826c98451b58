"""`python -m orchestrator.lab.avocado_run run ... --spawner cvmlab-fork`: avocado's own
command line, with the fork server started before avocado runs (a fork of this process).

Why: in the lab (Python under TCG), `import avocado` takes seconds and the fork
server's preload more. avocado starts its spawner only when the job runs its suite,
so the first test waited for both in turn: 31 s from `avocado run` to the first test
of a one-test smoke job on 7.3. Here the server is forked right after the imports
both need (`fork_server.start_server_as_fork`) and imports our layers on the lab's
other vCPU while this process loads avocado's plugins, parses and resolves; avocado
finds those plugins through `importlib.metadata` (`entry_points`), not setuptools.
Everything else is avocado's `main()` with the same arguments: what `cvmlab profile
run --inside-lab` prints is what runs.
"""

from __future__ import annotations

import os
import sys

from orchestrator.lab import entry_points
from orchestrator.lab.fork_server import chooses_fork_spawner, job_preload, start_server_as_fork


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # avocado's plugins through importlib.metadata: 4 s less of every avocado import here.
    entry_points.install()
    if chooses_fork_spawner(args):
        # avocado's main() points TMP at /var/tmp when no temp dir is set; the forked
        # tests inherit the server's environment, so it gets the same before it starts.
        unset = not any(name in os.environ for name in ("TMP", "TEMP", "TMPDIR"))
        if unset and os.path.exists("/var/tmp"):
            os.environ["TMP"] = "/var/tmp"
        references = [arg for arg in args if ".py" in arg and not arg.startswith("-")]
        start_server_as_fork(("avocado.core.main",), job_preload(references))
    from avocado.core.main import main as avocado_main

    sys.argv = ["avocado", *args]
    status = avocado_main()
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
