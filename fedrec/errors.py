"""User-facing errors: scripts print them as one line and exit non-zero."""


class FedrecError(Exception):
    """Base class for errors caused by input (config, data, flags), not by a bug."""


class ConfigError(FedrecError, ValueError):
    """An unknown key, a wrong type or an inconsistent value in a config."""


class DataError(FedrecError, ValueError):
    """A data file that is missing, empty, malformed or of the wrong format."""


class RegistryError(FedrecError, KeyError):
    """An unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
