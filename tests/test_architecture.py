"""The architecture's rules (pyproject.toml [tool.importlinter]) hold, and they catch what they forbid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def test_the_project_keeps_every_contract() -> None:
    done = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout


def test_a_plugin_importing_a_private_module_is_named(tmp_path: Path) -> None:
    plugin = tmp_path / "stepflow_badplugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    (plugin / "operator.py").write_text(textwrap.dedent('''
        from stepflow._engine.scheduler import Runner  # private: may change in any release
        from stepflow.remote import JobBackend  # public: fine
    '''))
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent('''
        [tool.importlinter]
        root_packages = ["stepflow", "stepflow_badplugin"]

        [[tool.importlinter.contracts]]
        name = "Plugins import only stepflow's public API"
        type = "forbidden"
        source_modules = ["stepflow_badplugin"]
        forbidden_modules = ["stepflow._engine", "stepflow._store", "stepflow._stack", "stepflow._cli"]
        allow_indirect_imports = true
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([LINT, "--config", str(config)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stepflow_badplugin is not allowed to import stepflow._engine" in done.stdout
    assert "stepflow_badplugin.operator -> stepflow._engine.scheduler (l.2)" in done.stdout
