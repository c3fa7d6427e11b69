"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad training data or template: the message names the file, line or field and how to fix it.

    A ``ValueError`` subclass, so callers that already catch ``ValueError`` keep working.
    """


class NoRowsLeft(DataError):
    """Every row was dropped (empty, or without a trainable token within ``max_length``)."""
