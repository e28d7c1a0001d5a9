"""Errors a user can cause. The CLI prints their one-line message and exits with code 2."""


class DscError(Exception):
    """Base class of every error caused by user input (bad files, bad flags)."""


class ConfigError(DscError):
    """config.json is missing, unreadable or describes an unsupported model."""


class CheckpointError(DscError):
    """A weights file is missing, truncated, corrupt, or holds the wrong tensors."""


class CompileError(DscError):
    """The model cannot be compiled as asked (unsupported option, unwritable output)."""


class EngineError(DscError):
    """An engine file is missing, corrupt or does not match its manifest."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt, so that ``except Exception``
    does not swallow it and every ``except BaseException`` cleanup (atomic outputs, engine directories) runs."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
