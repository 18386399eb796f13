"""The examples in examples/ keep working."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    stats = module["main"]("memory://")
    out = capsys.readouterr().out
    assert "5 users in Germany; SQL statements: 1" in out  # the first run reads the users
    assert out.count("5 users in Germany; SQL statements: 0") == 2  # then both are hits
    assert "after the insert: 6 users" in out
    assert stats["query.hit"] == 2
    assert stats["entity.hit"] == 3
