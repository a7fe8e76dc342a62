"""The README's demo and import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_quickstart_runs_on_the_defaults(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "stepflow", "run", "examples.quickstart.pipeline:training"],
                         cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "best learning rate" in out.stdout
    assert "succeeded in" in out.stdout.splitlines()[-1]


def test_quickstart_programmatically() -> None:
    from examples.quickstart.pipeline import training
    from stepflow import run_sync

    result = run_sync(training(epochs=50, learning_rates=[0.01, 0.1]))
    assert result.succeeded
    assert result.output["lr"] == 0.1 and result.output["mse"] < 1.0
    assert sorted(result.steps) == sorted(
        ["load_data", "split", "train", "train_2", "evaluate", "evaluate_2", "pick_best"])


def test_import_is_light_and_imports_no_cloud_sdk() -> None:
    # Namespace packages (a bare `google` a .pth file makes at startup) carry no code and do not count.
    code = ("import sys, stepflow; heavy = [m for m, mod in list(sys.modules.items()) if m.split('.')[0] in "
            "('boto3','botocore','aiobotocore','google','azure','aiodocker','docker','rich','click',"
            "'structlog','cloudpickle','grpc','httpx','cryptography','dask','distributed') and getattr(mod, '__file__', None)]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("example", ["sagemaker", "vertex", "azureml"])
def test_the_cloud_examples_run_in_one_command(example: str, tmp_path: Path) -> None:
    """`bash examples/<cloud>/run_local.sh`: local control plane, emulated storage, the job on Docker."""
    from tests.docker_env import require_docker

    require_docker()
    env = {**os.environ, "STEPFLOW_HOME": str(tmp_path / "home"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", f"examples/{example}/run_local.sh", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "y = 2.00x + -0.99" in done.stdout and "succeeded" in done.stdout
