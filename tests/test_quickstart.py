"""The README's main command runs and learns (reduced: fewer steps)."""

from soft_rl.cli import main


def test_quickstart_learns(tmp_path, capsys):
    assert main(["quickstart", "--single-process", "--out", str(tmp_path), "--steps", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quickstart reward: before=")
    before, after = (float(x.split("=")[1]) for x in last.split(": ")[1].split())
    assert after >= before + 0.2, last
