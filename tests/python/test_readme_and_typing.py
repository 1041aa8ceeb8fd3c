"""The README's Python examples run against the real cluster of conftest.py, and
`mypy --strict` accepts them and the package itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clients" / "python"
READMES = [PACKAGE / "README.md", REPO / "README.md"]
# Every subprocess here ends by this many seconds.
LIMIT = 300
DEFAULT_TARGET = '"127.0.0.1:50051"'


def python_blocks(readme: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", readme.read_text(), flags=re.S | re.M)


def write_examples(tmp: Path) -> list[Path]:
    """Each README block as its own module (they reuse names, as examples do)."""
    files = []
    for j, readme in enumerate(READMES):
        for i, block in enumerate(python_blocks(readme)):
            path = tmp / f"readme{j}_example{i}.py"
            path.write_text(block)
            files.append(path)
    return files


def env_with_package() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(PACKAGE), env.get("PYTHONPATH", "")] if p)
    return env


def test_the_readme_has_sync_and_asyncio_examples() -> None:
    blocks = python_blocks(PACKAGE / "README.md")
    assert any("from arpcp_client import" in b and "with Client(" in b for b in blocks)
    assert any("from arpcp_client.aio import Client" in b and "asyncio.gather" in b for b in blocks)
    assert 'pip install "arpcp-client @ git+https://github.com/OWNER/arpcp#subdirectory=clients/python"' in (
        PACKAGE / "README.md"
    ).read_text()


def test_the_client_readme_examples_run(cluster, tmp_path: Path) -> None:
    blocks = python_blocks(PACKAGE / "README.md")
    for i, block in enumerate(blocks):
        assert DEFAULT_TARGET in block, f"example {i} does not use the default gateway address"
        script = tmp_path / f"example_{i}.py"
        script.write_text(block.replace(DEFAULT_TARGET, repr(cluster.grpc)))
        run = subprocess.run(
            [sys.executable, str(script)], env=env_with_package(), capture_output=True, text=True, timeout=LIMIT
        )
        assert run.returncode == 0, f"README example {i} failed:\n{run.stdout}\n{run.stderr}"
        assert "done" in run.stdout, run.stdout
    sync_out = subprocess.run(
        [sys.executable, str(tmp_path / "example_0.py")], env=env_with_package(), capture_output=True, text=True,
        timeout=LIMIT,
    ).stdout
    assert "failed division by zero 400" in sync_out and "cannot call the gateway" in sync_out, sync_out


def test_mypy_strict_accepts_the_package_and_the_readme_examples(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed: pip install './clients/python[typing]'")
    examples = write_examples(tmp_path)
    assert len(examples) >= 3, examples
    run = subprocess.run(
        [
            sys.executable, "-m", "mypy",
            "--config-file", str(PACKAGE / "pyproject.toml"),
            "--cache-dir", str(tmp_path / ".mypy_cache"),
            "--strict",
            "arpcp_client",
            *map(str, examples),
        ],
        cwd=PACKAGE,
        env={**env_with_package(), "MYPYPATH": str(PACKAGE)},
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert run.returncode == 0, f"mypy --strict:\n{run.stdout}\n{run.stderr}"
    assert "Success: no issues found" in run.stdout, run.stdout
