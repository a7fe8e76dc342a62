"""The ``subprocess`` flavor: options and per-step settings only.

stepflow imports this module when listing options or registering a component, so it must stay
light: attrs and ``stepflow.interfaces`` only. The operator itself is named by import path and
loaded when a stack that uses it runs.
"""

from __future__ import annotations

import attrs

from stepflow.interfaces import Flavor, option


@attrs.frozen
class SubprocessOperatorConfig:
    """Options of a ``subprocess`` step operator (``stepflow step-operator register --type=subprocess``)."""

    python: str | None = option(None, doc="Interpreter that runs the steps (default: the runner's own).")
    env: dict[str, str] = option({}, doc='Extra environment variables for every step, e.g. {"OMP_NUM_THREADS": "1"}.')
    inherit_env: bool = option(True, doc="Start from the runner's environment (false: only env and settings).")
    workdir: str | None = option(None, doc="Working directory of the step processes (default: the runner's).")
    max_concurrency: int | None = option(None, doc="Most step processes at once (none: no limit).")
    kill_grace_s: float = option(5.0, doc="Seconds between SIGTERM and SIGKILL when a step is cancelled.")

    def __attrs_post_init__(self) -> None:
        # ValueError here becomes a ConfigError at registration time, naming the option.
        if self.kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {self.kill_grace_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 (or none), got {self.max_concurrency}")


@attrs.frozen
class SubprocessSettings:
    """Per-step settings: ``@step(settings={"subprocess": {...}})`` or keyed by the component name."""

    env: dict[str, str] = option({}, doc="Extra environment variables for this step (override the operator's).")
    nice: int = option(0, doc="Niceness increment of the step's process (0-19: higher runs at lower priority).")

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be between 0 and 19, got {self.nice}")


class SubprocessFlavor(Flavor):
    """Runs every step attempt in a fresh Python subprocess of this machine."""

    kind = "step_operator"
    name = "subprocess"
    description = ("Run each step attempt in a fresh Python subprocess (isolated memory and globals, "
                   "environment per step, killed on cancel).")
    config_class = SubprocessOperatorConfig
    settings_class = SubprocessSettings
    implementation = "stepflow_subprocess.operator:SubprocessStepOperator"
