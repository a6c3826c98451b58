"""The report shows cvmlab's self-checks (S family) apart from the system's invariants."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from orchestrator.invariants.verdict import holds, incomplete
from orchestrator.report.html import _verdicts_table


def test_self_checks_get_their_own_table_and_incomplete_is_not_green(tmp_path: Path) -> None:
    verdicts = [
        holds("H3", "punched pages read zero", True),
        holds("S1", "cvmlab refuses a share=off punch", True),
        incomplete("H8", "records lost"),
    ]
    (tmp_path / "verdicts.json").write_text(json.dumps([asdict(v) for v in verdicts]))
    html = _verdicts_table(tmp_path)
    invariants, _, self_checks = html.partition("cvmlab self-checks")
    assert "<td>H3</td>" in invariants and "<td>S1</td>" not in invariants
    assert "<td>S1</td>" in self_checks and "<td>H3</td>" not in self_checks
    assert '<td class="s-WARN">incomplete</td>' in invariants
