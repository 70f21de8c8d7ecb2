"""The one error family. Every user mistake is raised as one of these, naming the file, bag or row.

The CLI prints the message on one line and exits with status 2; any other exception is a bug of ours.
"""


class MilcacheError(Exception):
    """Base of every error a user can cause and fix."""


class ManifestError(MilcacheError):
    """A manifest or labels table is malformed: missing columns, bad rows, missing files."""


class LabelError(MilcacheError):
    """Labels do not fit the task: unknown bags, a single class, too few bags for the folds."""


class StoreError(MilcacheError):
    """A feature store is missing, corrupt, or used in a way it cannot serve."""


class StoreMismatchError(StoreError):
    """Embeddings of another backbone, dim, dtype or preprocessing were about to be mixed into a store."""


class ExtractionError(MilcacheError):
    """A bag could not be turned into instances (missing file, no tissue, unreadable image...)."""


class OptionError(MilcacheError):
    """An option's value is out of its range or does not fit the others."""
