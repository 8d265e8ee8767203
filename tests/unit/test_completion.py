"""Shell completion as README "Shell completion" documents it: the lines it gives, run by the
shells themselves against a ``receipts`` script of this checkout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _documented_lines() -> list[str]:
    """The README's completion lines, one per shell."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Shell completion") :]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert block, "README 'Shell completion' has no sh block"
    return [line for line in block.group(1).splitlines() if "_RECEIPTS_COMPLETE" in line]


def test_the_readme_gives_one_line_per_shell() -> None:
    lines = _documented_lines()
    assert any("bash_source" in line and ".bashrc" in line for line in lines), lines
    assert any("zsh_source" in line and ".zshrc" in line for line in lines), lines
    assert any("fish_source" in line and "fish/completions" in line for line in lines), lines


def test_completion_answers_need_no_settings_nor_database() -> None:
    """A bad setting does not break completion (it runs before any command)."""
    answer = CliRunner().invoke(
        main,
        [],
        prog_name="receipts",
        env={
            "_RECEIPTS_COMPLETE": "bash_complete",
            "COMP_WORDS": "receipts rejected res",
            "COMP_CWORD": "2",
            "RECEIPTS_CUTOFF": "not a duration",
        },
    )
    assert answer.exit_code == 0, answer.output
    assert answer.output.split() == ["plain,resubmit"]


@pytest.fixture
def receipts_script(tmp_path: Path) -> dict[str, str]:
    """A ``receipts`` executable on PATH that runs this checkout's command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "receipts"
    script.write_text(f"#!{sys.executable}\nfrom worker.cli import main\nmain()\n")
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_commands_with_the_documented_line(receipts_script: dict[str, str]) -> None:
    [line] = [line for line in _documented_lines() if "bash_source" in line]
    # The line as documented appends to ~/.bashrc; what it appends is what bash runs. Bash
    # calls a completion function with the command's name as its first argument.
    setup = line.split(">>")[0].replace("echo ", "", 1).strip().strip("'")
    probe = (
        f"{setup}\n"
        "COMP_WORDS=(receipts sta); COMP_CWORD=1; _receipts_completion receipts\n"
        'echo "${COMPREPLY[@]}"\n'
        "COMPREPLY=(); COMP_WORDS=(receipts rejected d); COMP_CWORD=2\n"
        "_receipts_completion receipts\n"
        'echo "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", probe],
        env=receipts_script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stale status", "dismiss"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_get_their_scripts(shell: str) -> None:
    script = CliRunner().invoke(
        main, [], prog_name="receipts", env={"_RECEIPTS_COMPLETE": f"{shell}_source"}
    )
    assert script.exit_code == 0, script.output
    assert "_RECEIPTS_COMPLETE" in script.output and "receipts" in script.output
