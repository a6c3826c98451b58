"""The lab's avocado spawner (orchestrator/lab/fork_spawner.py), run by real avocado jobs.

Each test forks from a server that imported avocado and cvmlab once; statuses,
timeouts and reaping must be exactly what avocado's process spawner gives.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator.lab.fork_server import KVM_TEST_IMPORTS, chooses_fork_spawner, job_preload
from orchestrator.lab.fork_spawner import NAME, POLL_INTERVAL, PRELOAD, drain_monitor
from orchestrator.profiles import FORK_SPAWNER, LAB_AVOCADO

AVOCADO = str(Path(sys.executable).with_name("avocado"))

SCENARIO = '''
import os, sys, time
from avocado import Test

class Forked(Test):
    def test_sees_the_preloaded_scenario_layer(self):
        # Imported by the server before the fork: not by this test.
        self.assertIn("orchestrator.scenario", sys.modules)
        # The host probe was measured once by the server, not by this test.
        from orchestrator.host.probe import shared_probe
        from orchestrator.scenario import default_qemu_binary
        self.assertNotEqual(shared_probe(default_qemu_binary()).measured_by, os.getpid())
        import multiprocessing
        self.assertEqual(multiprocessing.get_start_method(), "fork")
        with open(os.path.join(self.outputdir, "pid"), "w") as f:
            f.write(str(os.getpid()))

    def test_fails(self):
        self.fail("an invariant broke")

    def test_cancels(self):
        self.cancel("a capability is missing")

    def test_logs_many_lines(self):
        for number in range(200):
            self.log.info("line %d of 200", number)


class Slow(Test):
    timeout = 3

    def test_runs_past_its_timeout(self):
        with open(os.path.join(self.outputdir, "pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
'''


def _run_job(tmp_path: Path, spawner: str, avocado: Sequence[str] = (AVOCADO,)) -> dict[str, str]:
    scenario = tmp_path / "forked.py"
    scenario.write_text(SCENARIO)
    results = tmp_path / "results"
    done = subprocess.run(
        [*avocado, "run", str(scenario), "--spawner", spawner, "--job-results-dir",
         str(results), "--max-parallel-tasks", "2", "--disable-sysinfo"],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "CVMLAB_TEST_MARK": str(tmp_path)},
    )  # fmt: skip
    # avocado's exit bits: 1 a test failed, 8 a test was interrupted; 2 or 4 the job broke.
    assert done.returncode & ~(1 | 8) == 0, done.stdout + done.stderr
    (job,) = results.glob("job-*")
    report = json.loads((job / "results.json").read_text())
    return {test["name"].rsplit(".", 1)[-1]: test["status"] for test in report["tests"]}


@pytest.fixture(scope="module")
def forked_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One job under the fork spawner, shared by the tests that read its results."""
    tmp_path = tmp_path_factory.mktemp("forked")
    return tmp_path, _run_job(tmp_path, FORK_SPAWNER)


@pytest.mark.parametrize("spawner", [FORK_SPAWNER, "process"])
def test_statuses_match_the_process_spawner(tmp_path: Path, spawner: str) -> None:
    statuses = _run_job(tmp_path, spawner)
    assert statuses["test_fails"] == "FAIL"
    assert statuses["test_cancels"] == "CANCEL"
    assert statuses["test_runs_past_its_timeout"] == "INTERRUPTED"
    if spawner == FORK_SPAWNER:
        assert statuses["test_sees_the_preloaded_scenario_layer"] == "PASS"
    # avocado's notices about its own deprecated utilities, and asyncio's line for each
    # event loop, reach every test's log under avocado's spawner; a forked test drops them.
    (log,) = tmp_path.glob("results/job-*/test-results/*logs_many_lines*/debug.log")
    text = log.read_text()
    for noise in ("utility is deprecated", "Using selector"):
        assert (noise in text) == (spawner == "process"), noise


def test_the_lab_launcher_runs_the_same_job_with_the_server_started_first(
    tmp_path: Path, forked_job: tuple[Path, dict[str, str]]
) -> None:
    launched = _run_job(tmp_path, FORK_SPAWNER, (sys.executable, "-m", LAB_AVOCADO))
    assert launched == forked_job[1]


@pytest.mark.parametrize(
    ("argv", "chosen"),
    [
        (["run", "a.py", "--spawner", "cvmlab-fork"], True),
        (["run", "a.py", "--spawner=cvmlab-fork"], True),
        (["run", "a.py", "--spawner", "process"], False),
        (["run", "a.py", "--spawner"], False),
        (["list", "a.py", "--spawner", "cvmlab-fork"], False),
    ],
)
def test_the_launcher_starts_the_server_only_for_a_run_with_our_spawner(
    argv: list[str], chosen: bool
) -> None:
    assert chooses_fork_spawner(argv) is chosen


def test_every_log_line_of_a_forked_test_reaches_its_debug_log(
    forked_job: tuple[Path, dict[str, str]],
) -> None:
    tmp_path, statuses = forked_job
    assert statuses["test_logs_many_lines"] == "PASS"
    (log,) = tmp_path.glob("results/job-*/test-results/*logs_many_lines*/debug.log")
    lines = [line for line in log.read_text().splitlines() if "of 200" in line]
    assert [line.rsplit("| ", 1)[-1] for line in lines] == [f"line {n} of 200" for n in range(200)]


EARLY_START = """
import os, sys
from orchestrator.lab.fork_spawner import EarlyStart
EarlyStart().run({"subcommand": sys.argv[1], "run.spawner": sys.argv[2]})
children = set()
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as listing:
        children.update(listing.read().split())
servers = 0
for child in children:
    with open(f"/proc/{child}/cmdline", "rb") as cmdline:
        servers += b"forkserver" in cmdline.read()
print(servers)
"""


@pytest.mark.parametrize(
    ("subcommand", "spawner", "servers"),
    [("run", FORK_SPAWNER, 1), ("run", "process", 0), ("list", FORK_SPAWNER, 0)],
)
def test_the_server_starts_right_after_parsing_only_for_a_run_with_our_spawner(
    subcommand: str, spawner: str, servers: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EARLY_START, subcommand, spawner],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert int(done.stdout.split()[-1]) == servers


def test_drain_monitor_relays_everything_queued_in_one_poll_and_stops_at_finished() -> None:
    queue: multiprocessing.SimpleQueue[dict[str, str]] = multiprocessing.SimpleQueue()
    queue.put({"type": "early_state"})
    for number in range(50):
        queue.put({"type": "log", "log": str(number)})
    queue.put({"status": "finished", "result": "pass"})
    queue.put({"type": "log", "log": "after the end"})
    relayed = list(drain_monitor(queue))
    # No "running" between queued messages: one poll took all 50 and the finished one.
    assert [m.get("log") for m in relayed[:-1]] == [str(n) for n in range(50)]
    assert relayed[-1]["status"] == "finished"
    assert not queue.empty()  # what came after "finished" is not the runner's to relay


def test_drain_monitor_posts_running_while_the_test_is_quiet() -> None:
    queue: multiprocessing.SimpleQueue[dict[str, str]] = multiprocessing.SimpleQueue()
    monitor = drain_monitor(queue)
    assert next(monitor)["status"] == "running"
    queue.put({"status": "finished", "result": "pass"})
    assert next(monitor)["status"] == "finished"
    with pytest.raises(StopIteration):
        next(monitor)


def test_timed_out_test_is_reaped_and_no_server_outlives_the_job(
    forked_job: tuple[Path, dict[str, str]],
) -> None:
    tmp_path, _ = forked_job
    (pid_file,) = tmp_path.glob("results/job-*/test-results/*past_its_timeout*/data/pid")
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    # Every process the job started inherited the mark: none may outlive the job.
    mark = f"CVMLAB_TEST_MARK={tmp_path}".encode()
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120])
        except OSError:
            continue
    assert not left, f"processes outlived their avocado job: {left}"


def test_preload_names_the_spawner_itself_and_polls_slower_than_avocado() -> None:
    # The server unpickles run_runner from this module; avocado polls every 0.01 s.
    assert "orchestrator.lab.fork_spawner" in PRELOAD
    assert POLL_INTERVAL > 0.01
    assert FORK_SPAWNER == NAME  # the profiles name the spawner the plugin registers
    assert os.path.exists(AVOCADO)


AS_FORK = """
import os, sys
from multiprocessing import forkserver
from orchestrator.lab.fork_server import CONTEXT, start_server_as_fork

start_server_as_fork(('json',))
server = forkserver._forkserver._forkserver_pid
with open(f"/proc/{server}/stat") as stat:
    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
same_program = open(f"/proc/{server}/cmdline").read() == open("/proc/self/cmdline").read()
child = CONTEXT.Process(target=sys.exit, args=(7,))
child.start()
child.join(60)
from multiprocessing import resource_tracker
tracker = resource_tracker._resource_tracker._pid
tracker_same = open(f"/proc/{tracker}/cmdline").read() == open("/proc/self/cmdline").read()
tracker_fds = sorted(int(fd) for fd in os.listdir(f"/proc/{tracker}/fd"))
print(server, parent == os.getpid(), same_program, child.exitcode,
      tracker, tracker_same, len(tracker_fds) <= 4)
"""


def test_the_launchers_server_is_a_fork_that_serves_and_exits_with_its_client(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", AS_FORK, "marker-argument"],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip
    server, forked, same_program, exitcode, tracker, tracker_is_fork, few_fds = done.stdout.split()
    # A fork of the client (no second interpreter importing avocado), whose children
    # run and report their exit status; it is gone once its client has exited.
    assert (forked, same_program, exitcode) == ("True", "True", "7")
    assert _exits_within(int(server), 10), f"server {server} outlived its client"
    # multiprocessing's resource tracker too: a fork holding stdio and its pipe only.
    assert (tracker_is_fork, few_fds) == ("True", "True")
    assert _exits_within(int(tracker), 10), f"resource tracker {tracker} outlived its client"


def test_job_preload_adds_what_the_jobs_files_import_and_keeps_the_probe_last(
    tmp_path: Path,
) -> None:
    kvm_test = tmp_path / "kvm_test.py"
    kvm_test.write_text("import os\nfrom orchestrator.kvm_scenario import KvmScenario\n")
    guest_test = tmp_path / "guest_test.py"
    guest_test.write_text(
        "from orchestrator.machine_scenario import MachineScenario\n"
        "def later():\n    import orchestrator.repro\n"
    )
    kvm_only = job_preload([f"{kvm_test}:KvmTest.test_x"])
    assert "orchestrator.kvm_scenario" in kvm_only
    assert set(KVM_TEST_IMPORTS) <= set(kvm_only)
    assert "orchestrator.machine_scenario" not in kvm_only
    both = job_preload([str(kvm_test), str(guest_test)])
    assert "orchestrator.machine_scenario" in both
    assert "orchestrator.repro" not in both  # imported inside a function: not preloaded
    # Aliases, missing files and broken sources add nothing; the probe stays last.
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert job_preload(["boot", str(tmp_path / "missing.py"), str(broken)]) == list(PRELOAD)
    assert both[-1] == kvm_only[-1] == PRELOAD[-1] == "orchestrator.lab.fork_warm"


def test_a_test_without_a_guest_imports_no_guest_qemu_or_image_layer() -> None:
    # In the lab every module is seconds of Python under TCG per job.
    code = (
        "import sys, orchestrator.kvm_scenario\n"
        "heavy = ('orchestrator.machine_scenario', 'orchestrator.qemu.spec', "
        "'orchestrator.image', 'orchestrator.guest.memhelper', 'orchestrator.repro', "
        "'orchestrator.host.confidential', 'orchestrator.memory.backing')\n"
        "print(' '.join(m for m in heavy if m in sys.modules) or 'none')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["none"]


def _exits_within(pid: int, timeout: float) -> bool:
    """Whether process `pid` has exited, or does within `timeout` s (its pidfd says)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
