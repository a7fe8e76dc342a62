from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own STEPFLOW_HOME so nothing leaks into the user's."""
    home = tmp_path / "stepflow-home"
    monkeypatch.setenv("STEPFLOW_HOME", str(home))
    return home


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path), env.get("PYTHONPATH", "")])
    env["STEPFLOW_HOME"] = str(tmp_path / "stepflow-home")
    env["COLUMNS"] = "120"
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def anyio_backend() -> str:
    """stepflow runs on asyncio."""
    return "asyncio"


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark every ``async def`` test for anyio before pytest parametrizes it."""
    import inspect

    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)
