"""The package as users get it: `python -m build` makes a wheel and an sdist of
clients/python; each installs in a fresh venv, away from the repository, and the
installed client runs a task on the test cluster of conftest.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "clients" / "python"
# Every subprocess here (a build, a venv, an install) ends by this many seconds.
LIMIT = 300


def sh(
    args: list[str], cwd: Path, what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=LIMIT)
    assert run.returncode == 0, f"{what} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built as `python -m build` does."""
    env = dict(os.environ)
    # Asked of the tool itself: a stray build/ directory on the path also imports as "build".
    version = [sys.executable, "-m", "build", "--version"]
    if subprocess.run(version, capture_output=True, timeout=LIMIT).returncode != 0:
        # Into a directory of its own, so that this environment stays as it was.
        tools = tmp_path_factory.mktemp("build-tool")
        run = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(tools), "build"],
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.skip(f"the `build` tool is missing and `pip install build` failed: {last}")
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tools), env.get("PYTHONPATH", "")] if p)
    # A clean copy laid out as in the repository: what a build left in the work tree
    # (build/, *.egg-info with its SOURCES.txt, generated stubs) must not count.
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(REPO / "proto", tree / "proto")
    shutil.copytree(
        PACKAGE,
        tree / "clients" / "python",
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "_generated", "__pycache__"),
    )
    out = tmp_path_factory.mktemp("dist")
    args = [sys.executable, "-m", "build", "--outdir", str(out)]
    # With setuptools and grpcio-tools already here, build offline in this environment.
    if have("setuptools") and have("grpc_tools"):
        args.append("--no-isolation")
    sh([*args, str(tree / "clients" / "python")], tree, "python -m build", env)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_the_sdist_carries_what_building_it_needs(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "setup.py",
        "generate.py",
        "pyproject.toml",
        "arpcp_client/py.typed",
        "arpcp_client/aio.py",
        "arpcp_client/_generated/gateway_pb2.py",
        "arpcp_client/_generated/gateway_pb2_grpc.pyi",
    ):
        assert needed in names, f"{needed} missing from {dist['sdist'].name}: {sorted(names)}"


def test_the_wheel_is_typed_and_pins_what_the_stubs_need(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = whl.read(meta).decode()
    assert {"arpcp_client/py.typed", "arpcp_client/_generated/gateway_pb2.pyi",
            "arpcp_client/_generated/gateway_pb2_grpc.pyi"} <= names
    assert "Requires-Python: >=3.10" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(r.startswith("Requires-Dist: grpcio") and ">=" in r and "<2" in r for r in requires), requires
    assert any(r.startswith("Requires-Dist: protobuf") and ">=" in r and "<" in r.replace(">=", "") for r in requires), requires


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_each_installs_in_a_fresh_venv_and_runs_a_task(
    kind: str, dist: dict[str, Path], tmp_path: Path, cluster
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    sh(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(dist[kind])],
        tmp_path,
        f"pip install {dist[kind].name}",
    )
    check = (
        "import asyncio, arpcp_client, arpcp_client.aio as aio\n"
        "from pathlib import Path\n"
        "print(Path(arpcp_client.__file__).parent)\n"
        f"target = {cluster.grpc!r}\n"
        "with arpcp_client.Client(target) as c:\n"
        "    print(c.start('add', 2, 3).result(timeout=30))\n"
        "async def main():\n"
        "    async with aio.Client(target) as c:\n"
        "        return await c.call('mul', 6, 7)\n"
        "print(asyncio.run(main()))\n"
    )
    # Run from an empty directory so that nothing of the repository is importable.
    out = sh([str(python), "-c", check], tmp_path, f"the client installed from the {kind}").stdout.split()
    installed = Path(out[0])
    assert installed.is_relative_to(env_dir), installed
    assert (installed / "py.typed").is_file()
    assert out[1:] == ["5", "42"], out
