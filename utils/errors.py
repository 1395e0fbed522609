"""The project's own error types. Scripts turn these (and clip's download and checkpoint errors)
into one-line messages at their edge; any other exception is a bug and keeps its traceback."""


class ClipFHError(Exception):
    """Base class of every error the scripts report as one line."""


class SplitInputError(ClipFHError, ValueError):
    """Bad input to split preparation, or a split root that cannot be read; the message names the
    file or flag to fix."""


class ImageLoadError(ClipFHError, ValueError):
    """An image that cannot be read. The message always names the file. It takes a single message
    argument so that a DataLoader worker can re-raise it in the main process."""


class TrainingInputError(ClipFHError, ValueError):
    """Bad training input (data folder, flags, checkpoint); the message says what to fix."""


class OutputExistsError(ClipFHError, FileExistsError):
    """An output folder or file that holds earlier results; the message names the flag to pass."""


class NonFiniteLossError(ClipFHError, RuntimeError):
    """A NaN or inf loss; the message names the epoch and batch."""


class EvaluationInputError(ClipFHError, ValueError):
    """Bad input to an evaluation (flags, images, result files, non-finite features)."""


class AttributeInputError(ClipFHError, ValueError):
    """Bad input to the attribute evaluation (HandInfo.csv values, prompt file, flags)."""


class OutputBusyError(ClipFHError):
    """Another process holds the lock of an output folder; the message names the folder."""


class OutputWriteError(ClipFHError, OSError):
    """An output location that cannot take what a script writes (full, read-only, not writable);
    the message names the path."""


class RecipeError(ClipFHError, ValueError):
    """A recipe of reproduce.py that cannot be read or run (a missing field, an unknown method or
    script, a split root outside the data folders it lists)."""


class InputFileError(ClipFHError, ValueError):
    """A file we read (config.json, results.json, a .mat result file) that is missing, truncated, not
    of the expected kind, lacks a key or disagrees with itself; the message names the file and what is
    wrong."""
