"""The command lines a newcomer types: README's and `make help`'s, errors without tracebacks."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _readme_commands() -> list[str]:
    lines = []
    for block in _readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def _my_yaml(tmp_path: Path) -> Path:
    """README's `my.yaml` example, written where the commands can read it."""
    block = next(b for b in _readme_blocks("yaml") if b.startswith("# my.yaml"))
    path = tmp_path / "my.yaml"
    path.write_text(block)
    return path


def _make_lines(target_and_vars: list[str]) -> list[str]:
    """`make -n ...`: the recipe lines make would run (nothing is executed)."""
    out = subprocess.run(
        ["make", "-n", *target_and_vars], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")
    return [line for line in out.splitlines() if line.strip()]


def _dry_run_embbench(line: str, capsys) -> None:
    """Run an `... -m embbench ARGS` line as `embbench --dry-run ARGS` in this process."""
    tokens = shlex.split(line)
    args = tokens[tokens.index("embbench") + 1 :]
    assert main(["--dry-run", *args]) == 0, line
    out = capsys.readouterr().out
    assert "would" in out, (line, out)


def _check_command(line: str, tmp_path: Path, capsys, monkeypatch) -> int:
    """Check one command line in a cheap mode; return how many embbench calls it made."""
    monkeypatch.chdir(ROOT)
    line = line.replace("my.yaml", str(_my_yaml(tmp_path)))
    tokens = shlex.split(line)
    if tokens[0] == "make":
        embbench_lines = [x for x in _make_lines(tokens[1:]) if "-m embbench" in x]
        for x in embbench_lines:
            _dry_run_embbench(x, capsys)
        return len(embbench_lines)
    if "-m" in tokens and "embbench" in tokens:
        _dry_run_embbench(line, capsys)
        return 1
    if tokens[0].endswith("papermill"):
        out = tmp_path / "prepared.ipynb"
        args = [str(out) if t == "out.ipynb" else t for t in tokens[1:]]
        subprocess.run(
            [sys.executable, "-m", "papermill", *args, "--prepare-only"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        assert out.is_file()
        return 0
    raise AssertionError(f"the test does not know how to check {line!r}")


@needs_make
def test_every_readme_command_line_parses_and_validates(tmp_path, capsys, monkeypatch):
    lines = _readme_commands()
    assert any(x.startswith("make demo") for x in lines)
    calls = sum(_check_command(x, tmp_path, capsys, monkeypatch) for x in lines)
    assert calls >= 5


@needs_make
def test_every_make_help_target_runs_in_a_dry_mode(tmp_path, capsys, monkeypatch):
    # --no-print-directory: under `make test` (a nested make) "make[1]: Entering ..." lines
    # would otherwise be read as targets
    helptext = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    plain = re.sub(r"\x1b\[[0-9;]*m", "", helptext)
    targets = [line.split()[0] for line in plain.splitlines() if line.strip()]
    assert "nb-<notebook>" in targets and "nb-%" not in targets
    calls = 0
    for target in targets:
        name = "nb-01_embed" if target == "nb-<notebook>" else target
        calls += _check_command(f"make {name}", tmp_path, capsys, monkeypatch)
    assert calls >= 4  # demo, nb-01_embed, report, pipeline


@pytest.mark.parametrize(
    "args",
    [
        ["report", "-f", "params/05_analysis.yaml", "--help"],
        ["report", "--help"],
        ["run-notebook", "--help"],
        ["embed", "--help"],
        ["run-cell", "--help"],
        ["pipeline", "compile", "--help"],
        ["ray", "run", "--help"],
        ["verify", "--help"],
        ["demo", "--help"],
        ["--help"],
    ],
)
def test_help_of_every_command(args, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_user_error_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: [resnet50]\n")
    assert main(["run-notebook", "01_embed", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(bad) in err and "modles" in err
    assert len(err.strip().splitlines()) <= 2
    assert main(["report", "-f", str(tmp_path / "missing.yaml")]) == 2


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from embbench.config import ConfigError

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError):
        main(["--debug", "run-notebook", "01_embed", "-f", str(tmp_path / "missing.yaml")])


def test_the_entry_point_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "embbench",
            "run-cell",
            "01_embed",
            "-f",
            str(tmp_path / "missing.yaml"),
            "--model",
            "resnet50",
            "--dataset",
            "demo",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "missing.yaml" in proc.stderr
