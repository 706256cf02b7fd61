"""Running the CLI in-process from tests: `run_cli(argv, monkeypatch, capsys) -> (exit code, stdout, stderr)`."""
from __future__ import annotations

import sys

import pytest


def run_cli(argv, monkeypatch, capsys):
    from sparsedeploy import cli

    monkeypatch.setattr(sys, "argv", ["sparsedeploy", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err
