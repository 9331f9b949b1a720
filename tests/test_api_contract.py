"""The wire contract as buf sees it: no silent breaking change against the previous commit.

`buf lint` and `buf format` run in scripts/test.sh; this file holds the check that needs
git history. The rule (also in README, "API"): proto/ of the working tree is compared with
proto/ at HEAD~1; a commit that breaks the contract on purpose adds a line to
proto/BREAKING, and for that commit the break is accepted and reported as a skip reason.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUF = REPO / "node_modules" / ".bin" / "buf"
BREAKING = "proto/BREAKING"


def git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)


def previous_proto(tmp_path: Path) -> Path:
    """A buf workspace holding HEAD~1's proto/ and today's buf.yaml (skip if there is none)."""
    if not BUF.exists():
        pytest.skip("buf is not installed (scripts/setup.sh installs it with npm)")
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: no previous commit to compare with")
    if git("rev-parse", "--verify", "-q", "HEAD~1").returncode != 0:
        pytest.skip("no previous commit in this clone (first commit or shallow clone)")
    archive = git("archive", "--format=tar", "HEAD~1", "proto")
    if archive.returncode != 0:
        pytest.skip("the previous commit has no proto/")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path, filter="data")
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def accepted_break() -> str | None:
    """The reason line added to proto/BREAKING since HEAD~1, if any."""
    diff = git("diff", "--unified=0", "HEAD~1", "--", BREAKING).stdout.decode()
    added = [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++") and line[1:].strip()
    ]
    added = [line for line in added if not line.startswith("#")]
    return added[-1] if added else None


def test_no_unannounced_breaking_change(tmp_path: Path) -> None:
    against = previous_proto(tmp_path)
    result = subprocess.run(
        [str(BUF), "breaking", "--against", str(against), "--error-format", "text"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    reason = accepted_break()
    if result.returncode != 0 and reason is not None:
        pytest.skip(f"breaking change accepted in proto/BREAKING: {reason}")
    assert result.returncode == 0, (
        "buf breaking against HEAD~1 (add a line to proto/BREAKING if this is on purpose):\n"
        + result.stdout
        + result.stderr
    )


def test_buf_lint_and_format_are_clean() -> None:
    """STANDARD + COMMENTS lint and buf's format (also run by scripts/test.sh)."""
    if not BUF.exists():
        pytest.skip("buf is not installed (scripts/setup.sh installs it with npm)")
    lint = subprocess.run([str(BUF), "lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [str(BUF), "format", "-d", "--exit-code"], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
