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


def test_a_swallowed_ctrl_c_is_raised_again_until_cleanup_starts():
    """An interrupt lost in a finaliser (Python only prints it) is re-raised, so the demo
    still stops; once cleanup begins, the previous handler is back and nothing is re-sent."""
    import os
    import signal
    import time

    import pytest

    from pipelines.demo.console import Interrupts

    before = signal.getsignal(signal.SIGINT)
    guard = Interrupts(resend_s=0.2).install()
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # lost, as in a finaliser
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # still working: the interrupt comes again
                time.sleep(0.01)
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
    time.sleep(0.5)  # nothing is re-sent after uninstall (a KeyboardInterrupt would fail here)
