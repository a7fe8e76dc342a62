"""Errors the ``subprocess`` step operator raises in the runner.

The scheduler reports a step's error as ``type(exc).__name__: str(exc)`` and, when the exception
has a ``remote_traceback`` attribute, uses that text as the step's traceback.
"""

from __future__ import annotations

from stepflow.errors import NonRetryableError, StepflowError
from stepflow.errors import RemoteStepError as CoreRemoteStepError


class SubprocessOperatorError(StepflowError):
    """Base of every error of the subprocess step operator."""


class SubprocessStartError(SubprocessOperatorError, NonRetryableError):
    """The step's interpreter could not be started (bad ``python`` or ``workdir``); not retried."""


class ChildProcessDiedError(SubprocessOperatorError):
    """The step's process ended without writing a result (killed, crashed, ``os._exit``)."""

    def __init__(self, message: str, *, returncode: int, stderr_tail: list[str]) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def __reduce__(self) -> tuple[object, ...]:  # keyword-only arguments: pickle explicitly
        return _rebuild, (type(self), (str(self),), {"returncode": self.returncode,
                                                     "stderr_tail": self.stderr_tail})


class PayloadRefusedError(SubprocessOperatorError, NonRetryableError):
    """The child refused the payload (tampered, or another Python/cloudpickle); nothing ran."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild, (type(self), (str(self),), {"reason": self.reason})


class TamperedResultError(SubprocessOperatorError, NonRetryableError):
    """The result's signature did not verify in the runner; it was not unpickled."""


class RemoteStepError(SubprocessOperatorError, CoreRemoteStepError):
    """The step raised in its subprocess (a :class:`stepflow.errors.RemoteStepError`).

    ``str()`` is ``"<RemoteType>: <message>"``; ``remote_traceback`` is the child's full
    traceback text, ``remote_type`` the exception's qualified class name and
    ``remote_exception`` the original exception when it could be unpickled here (also set as
    ``__cause__``), else None.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str,
                 remote_exception: BaseException | None = None) -> None:
        name = remote_type.rpartition(".")[2]
        CoreRemoteStepError.__init__(self, f"{name}: {message}" if message else name,
                                     remote_traceback, remote_type)
        self.remote_message = message
        self.remote_exception = remote_exception

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.remote_type, self.remote_message, self.remote_traceback)


class RemoteNonRetryableError(RemoteStepError, NonRetryableError):
    """The step raised a :class:`stepflow.NonRetryableError` in its subprocess: not retried."""


def _rebuild(cls: type[Exception], args: tuple[object, ...], kwargs: dict[str, object]) -> Exception:
    return cls(*args, **kwargs)
