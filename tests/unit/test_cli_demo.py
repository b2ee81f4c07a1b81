"""`mova demo` through the real CLI entry point."""

from __future__ import annotations

import json

from mova.factory import from_pretrained
from pipelines.cli import main


def test_demo_prints_routing_and_answers_and_saves(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    ckpt = tmp_path / "ckpt"
    assert main(["demo", "--tour", "--max-new-tokens", "4", "--json", str(out_json),
                 "--save", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "How many" in printed and "Which bar is the highest?" in printed
    assert "routing reply" in printed and "gate weights" in printed
    results = json.loads(out_json.read_text())
    assert len(results) == 2
    assert results[0]["forced"] == ["dinov2", "codetr"]
    for block in results[1]["gate_weights"]:
        assert abs(sum(block) - 1) < 1e-5
        assert sum(w > 0 for w in block) <= 3
    model = from_pretrained(ckpt)
    assert model.expert_names[0] == "dinov2"


def test_cli_reports_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["nonsense"])
