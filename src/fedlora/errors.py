"""User-facing errors: one message that names the problem and the fix.

Anything raised as a `FedloraError` reaches the user as a single line (no traceback)
and a non-zero exit code; anything else is a bug.
"""


class FedloraError(Exception):
    """Base class for errors caused by the user's input, not by fedlora."""


class ConfigError(FedloraError):
    """A configuration key, type or value is wrong."""


class DataError(FedloraError):
    """The data set cannot be loaded or split as asked."""


class ModelError(FedloraError):
    """The model path does not hold a usable model."""


class PrivacyBudgetExhausted(FedloraError):
    """A client would exceed its (epsilon, delta) budget by training further."""


class FederationError(FedloraError):
    """Too few sites answered, or a site's reply or setup does not fit the run."""
