"""rawtune's own exception types.

Every error a user can cause (bad flag, missing file, no Hub access, ...) is raised as one of
these with a message that says what was wrong and how to fix it. The CLI turns them into one
line and exit code 1; the UI turns them into ``gr.Error``.
"""


class RawtuneError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ConfigError(RawtuneError):
    """A setting, flag or YAML key is invalid."""


class DataError(RawtuneError):
    """The dataset could not be read, or nothing usable was left after cleaning."""


class ModelError(RawtuneError):
    """The base model could not be found or loaded."""


class TrainError(RawtuneError):
    """Training could not start or continue."""


class ExportError(RawtuneError):
    """Merging, GGUF conversion, quantization or verification failed."""


class HubError(RawtuneError):
    """A Hugging Face Hub request failed (not found, no access, read-only token...)."""


class LimitError(RawtuneError):
    """A shared app's limit (its disk budget, work in flight per visitor) refuses this for now."""


class StageMissing(RawtuneError):
    """A stage needs the output of an earlier stage that has not been run."""
