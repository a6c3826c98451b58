"""The ordered steps a test took, read back from its `qmp.jsonl` and `timeline.jsonl`.

Pure parsing: records in, steps out (`read_jsonl` is the only function that reads a
file). A step is one thing the test did to the machine that a reproducer can do again:

- `qmp`: a QMP command the test sent (from qmp.jsonl, paired with its reply by id);
- `ssh`: a guest command (timeline source "ssh": "command", then "result" or
  "command-failed");
- `upload`: a file copied into the guest (timeline "ssh"/"upload");
- `punch`: a host hole punch (timeline "op"/"punch").

What is not the test's own doing is left out, by kind and by time window:
- `qmp_capabilities` (the handshake), always;
- everything before the guest was ready (the last machine "ready" milestone: a start
  may have made ready and stopped another machine first, e.g. the cold boot that saved
  the snapshot the test then restored): the launcher's `human-monitor-command info
  usernet` and nothing else of the test's, since `MachineScenario.setUp` returns only
  after the guest is ready;
- a cold start's snapshot save, which follows its ready milestone (`stop`,
  `migrate`, `cont` and the capabilities around them): the window opens at the
  start's "snapshot-save" record when there is one;
- everything at or after the test's end (`end`, the moment tearDown began), or
  after the first shutdown milestone when no end is given: tearDown's `dmesg`,
  the shutdown ladder's `system_powerdown`/`quit`.

The failing step: we cannot know which outcomes a test expected (a test may
expect a QMP error or a non-zero exit), so the failure is placed in time instead.
The failure time is the first failed verdict (timeline "verdict"/"fail"), else the
first guest crash (timeline "machine"/"crash"), else the test's end; the failing
step is the LAST step that started at or before that time. Each step also keeps its
own outcome (ok, exit status, QMP error class), so a reader sees every failure.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

StepKind = Literal["qmp", "ssh", "upload", "punch"]
STEP_KINDS: tuple[StepKind, ...] = ("qmp", "ssh", "upload", "punch")

# QMP commands that end or reset the machine: listed, never replayed.
MACHINE_ENDING_QMP = frozenset({"quit", "system_powerdown", "system_reset"})
# Their HMP spellings inside human-monitor-command.
MACHINE_ENDING_HMP = frozenset({"quit", "q", "system_powerdown", "system_reset"})


@dataclass(frozen=True)
class JsonlRead:
    """The complete records of a JSON-lines file, and what was wrong with the rest."""

    records: list[dict[str, Any]]
    problems: list[str]


def parse_jsonl(text: str, name: str) -> JsonlRead:
    """Every complete JSON object line of `text`; a cut-off or broken line is a problem.

    A runner killed while writing leaves a last line without its newline: that one
    is reported as cut off; any other unreadable line as not JSON.
    """
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    lines = text.split("\n")
    ends_cleanly = text.endswith("\n") or text == ""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if last and not ends_cleanly:
                problems.append(f"{name} line {number} is cut off (the writer was killed?)")
            else:
                problems.append(f"{name} line {number} is not JSON")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            problems.append(f"{name} line {number} is not a JSON object")
    return JsonlRead(records, problems)


def read_jsonl(path: Path) -> JsonlRead:
    """`parse_jsonl` of a file; a missing file has no records and no problem."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return JsonlRead([], [])
    return parse_jsonl(text, Path(path).name)


@dataclass(frozen=True)
class Step:
    """One action of the test, numbered from 1 in the order it started.

    `action` says what to do again: qmp {"execute", "arguments"}; ssh {"cmd"};
    upload {"local", "remote", "mode"}; punch {"gpa", "length", "memdev"}.
    `outcome` is the recorded result in words ("ok", "exit 1", "GenericError: ...").
    `events_after` names the QMP events that arrived after the step started and
    before the next one: a test often waited for them, so a replay does too.
    """

    n: int
    t: float
    kind: StepKind
    action: dict[str, Any]
    ok: bool
    outcome: str
    seconds: float | None = None
    events_after: tuple[str, ...] = ()

    def describe(self) -> str:
        """The step in one line: `qmp query-status {}` or `ssh cat /proc/meminfo`."""
        a = self.action
        if self.kind == "qmp":
            args = a.get("arguments")
            text = f"qmp {a.get('execute')}"
            return f"{text} {json.dumps(args, sort_keys=True)}" if args else text
        if self.kind == "ssh":
            return f"ssh {a.get('cmd')}"
        if self.kind == "upload":
            return f"upload {a.get('local')} -> {a.get('remote')} (mode {a.get('mode')})"
        return f"punch gpa {a.get('gpa'):#x} length {a.get('length'):#x} of {a.get('memdev')}"

    @property
    def ends_machine(self) -> bool:
        """A QMP step that quits, powers down or resets the machine."""
        if self.kind != "qmp":
            return False
        command = str(self.action.get("execute"))
        if command in MACHINE_ENDING_QMP:
            return True
        if command == "human-monitor-command":
            line = str((self.action.get("arguments") or {}).get("command-line", ""))
            words = line.split()
            return bool(words) and words[0] in MACHINE_ENDING_HMP
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "t": self.t,
            "kind": self.kind,
            "action": self.action,
            "ok": self.ok,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "events_after": list(self.events_after),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Step:
        """Read a step back; raises ValueError/KeyError/TypeError on a malformed one."""
        kind = data["kind"]
        if kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {kind!r}")
        seconds = data.get("seconds")
        return Step(
            n=int(data["n"]),
            t=float(data["t"]),
            kind=kind,
            action=dict(data["action"]),
            ok=bool(data["ok"]),
            outcome=str(data["outcome"]),
            seconds=None if seconds is None else float(seconds),
            events_after=tuple(str(e) for e in data.get("events_after", ())),
        )


@dataclass(frozen=True)
class Extraction:
    """The steps of one test and where its failure is.

    `ready` and `end` bound the steps taken (None: unbounded on that side);
    `failure_t` and `failure_cause` say where the failure was placed (see the
    module docstring); `failed_step` is the last step at or before it (None when
    there are no steps).
    """

    steps: list[Step]
    failed_step: int | None
    ready: float | None
    end: float | None
    failure_t: float | None
    failure_cause: str
    problems: list[str] = field(default_factory=list)


def _first_t(records: Iterable[Mapping[str, Any]], source: str, kinds: set[str]) -> float | None:
    for record in records:
        if record.get("source") == source and record.get("kind") in kinds:
            return float(record["t"])
    return None


def _last_t(records: Iterable[Mapping[str, Any]], source: str, kinds: set[str]) -> float | None:
    times = [
        float(record["t"])
        for record in records
        if record.get("source") == source and record.get("kind") in kinds
    ]
    return max(times) if times else None


def _shutdown_start(timeline: Sequence[Mapping[str, Any]], after: float) -> float | None:
    """When the test's machine began to stop: its "shutdown" record minus the ladder's
    duration. Machines stopped before `after` (a start's, see extract_steps) are not it."""
    starts: list[float] = []
    for record in timeline:
        if record.get("source") != "machine":
            continue
        kind = record.get("kind")
        if kind == "shutdown":
            starts.append(float(record["t"]) - float(record.get("seconds") or 0.0))
        elif kind in ("killed", "exited"):
            starts.append(float(record["t"]))
    starts = [t for t in starts if t >= after]
    return min(starts) if starts else None


def _qmp_error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        return f"{error.get('class', 'Error')}: {error.get('desc', '')}".rstrip(": ")
    return f"error: {error}"


def _qmp_steps(records: Sequence[Mapping[str, Any]], lo: float, hi: float) -> list[Step]:
    """QMP commands in [lo, hi), each with the outcome of its reply."""
    replies: dict[str, Mapping[str, Any]] = {}
    for record in records:
        msg = record.get("msg")
        if record.get("kind") == "reply" and isinstance(msg, Mapping) and "id" in msg:
            replies.setdefault(str(msg["id"]), record)
    steps: list[Step] = []
    for record in records:
        msg = record.get("msg")
        if record.get("kind") != "command" or not isinstance(msg, Mapping):
            continue
        t = float(record["t"])
        command = str(msg.get("execute", ""))
        if not (lo <= t < hi) or command in ("", "qmp_capabilities"):
            continue
        reply = replies.get(str(msg.get("id"))) if "id" in msg else None
        reply_msg = reply.get("msg") if reply is not None else None
        if not isinstance(reply_msg, Mapping):
            ok, outcome, seconds = False, "no reply recorded", None
        elif "error" in reply_msg:
            ok, outcome = False, _qmp_error_text(reply_msg["error"])
            seconds = float(reply["t"]) - t if reply is not None else None
        else:
            ok, outcome = True, "ok"
            seconds = float(reply["t"]) - t if reply is not None else None
        action = {"execute": command, "arguments": msg.get("arguments") or {}}
        steps.append(Step(0, t, "qmp", action, ok, outcome, seconds))
    return steps


def _ssh_steps(timeline: Sequence[Mapping[str, Any]], lo: float, hi: float) -> list[Step]:
    """Guest commands, uploads and host punches in [lo, hi)."""
    steps: list[Step] = []
    # Commands wait for their result; FIFO per command text (shells run one at a time).
    pending: dict[str, deque[int]] = {}
    results: dict[int, tuple[bool, str, float | None]] = {}
    order: list[tuple[float, str, str | None]] = []
    for record in timeline:
        source, kind = record.get("source"), record.get("kind")
        t = float(record.get("t", 0.0))
        if source == "ssh" and kind == "command":
            cmd = str(record.get("cmd", ""))
            stdin = record.get("input")
            pending.setdefault(cmd, deque()).append(len(order))
            order.append((t, cmd, None if stdin is None else str(stdin)))
        elif source == "ssh" and kind in ("result", "command-failed"):
            cmd = str(record.get("cmd", ""))
            queue = pending.get(cmd)
            if not queue:
                continue
            index = queue.popleft()
            seconds = record.get("seconds")
            if kind == "result":
                status = int(record.get("exit_status", -1))
                outcome = "ok" if status == 0 else f"exit {status}"
                results[index] = (status == 0, outcome, seconds)
            else:
                results[index] = (False, f"error: {record.get('error', '')}", seconds)
        elif source == "ssh" and kind == "upload":
            seconds = float(record.get("seconds") or 0.0)
            started = t - seconds
            if lo <= started < hi:
                action = {
                    "local": record.get("local"),
                    "remote": record.get("remote"),
                    "mode": record.get("mode"),
                }
                steps.append(Step(0, started, "upload", action, True, "ok", seconds))
        elif source == "op" and kind == "punch" and lo <= t < hi:
            action = {
                "gpa": int(record["gpa"]),
                "length": int(record["length"]),
                "memdev": str(record["memdev"]),
            }
            t_end = record.get("t_end")
            took = float(t_end) - t if t_end is not None else None
            steps.append(Step(0, t, "punch", action, True, "ok", took))
    for index, (t, cmd, stdin) in enumerate(order):
        if not (lo <= t < hi):
            continue
        ok, outcome, seconds = results.get(index, (False, "no result recorded", None))
        secs = None if seconds is None else float(seconds)
        command: dict[str, Any] = {"cmd": cmd} if stdin is None else {"cmd": cmd, "input": stdin}
        steps.append(Step(0, t, "ssh", command, ok, outcome, secs))
    return steps


def _events(records: Sequence[Mapping[str, Any]]) -> list[tuple[float, str]]:
    events: list[tuple[float, str]] = []
    for record in records:
        msg = record.get("msg")
        if record.get("kind") == "event" and isinstance(msg, Mapping):
            events.append((float(record["t"]), str(msg.get("event"))))
    return events


def extract_steps(
    qmp_records: Sequence[Mapping[str, Any]],
    timeline_records: Sequence[Mapping[str, Any]],
    end: float | None = None,
) -> Extraction:
    """The test's steps, numbered 1..N by start time, and the failing one.

    `end` is when the test ended (tearDown began); without it, the first sign of
    the machine stopping ends the window. See the module docstring for what is
    excluded and how the failing step is chosen.
    """
    # The test's machine is the last one made ready: a start may have stopped others
    # first (a restore QEMU refused, the cold boot that saved the snapshot).
    ready = _last_t(timeline_records, "machine", {"ready"})
    if ready is None:
        # No ready milestone (a boot that never finished, or a machine without a
        # marker): start after the launcher's own SSH-port query.
        ready = _last_t(timeline_records, "machine", {"ssh-port", "qmp-up"})
    # A cold start saves its snapshot after ready: the harness's doing, not the test's.
    saved = _first_t(timeline_records, "start", {"snapshot-save"})
    lo = max(t for t in (ready, saved, -math.inf) if t is not None)
    stop = _shutdown_start(timeline_records, after=lo)
    window_end = end if end is not None else stop
    hi = window_end if window_end is not None else math.inf
    if stop is not None:
        hi = min(hi, stop)

    found = sorted(
        _qmp_steps(qmp_records, lo, hi) + _ssh_steps(timeline_records, lo, hi),
        key=lambda s: s.t,
    )
    events = [(t, name) for t, name in _events(qmp_records) if lo <= t < hi]
    steps: list[Step] = []
    for i, step in enumerate(found):
        upto = found[i + 1].t if i + 1 < len(found) else hi
        names = tuple(dict.fromkeys(name for t, name in events if step.t <= t < upto))
        steps.append(
            Step(i + 1, step.t, step.kind, step.action, step.ok, step.outcome, step.seconds,
                 names)
        )  # fmt: skip

    failed_verdict = _first_t(timeline_records, "verdict", {"fail"})
    crash = _first_t(timeline_records, "machine", {"crash"})
    candidates = [
        (failed_verdict, "the first failed verdict"),
        (crash, "the guest crash"),
    ]
    marked = [(t, why) for t, why in candidates if t is not None]
    if marked:
        failure_t, cause = min(marked)
    elif window_end is not None:
        failure_t, cause = window_end, "the end of the test"
    else:
        failure_t, cause = None, "the last recorded step"
    before = [s for s in steps if failure_t is None or s.t <= failure_t]
    failed_step = before[-1].n if before else None
    return Extraction(
        steps=steps,
        failed_step=failed_step,
        ready=ready,
        end=window_end,
        failure_t=failure_t,
        failure_cause=cause,
    )
