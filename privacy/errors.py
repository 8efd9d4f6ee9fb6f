"""Errors of the privacy package. Privacy checks fail closed: these are raised, never warned."""


class PrivacyError(ValueError):
    """Bad privacy parameters (epsilon, delta, noise) or a request that would break a guarantee."""


class EncryptionError(PrivacyError):
    """Insecure or mismatched encryption parameters, or a malformed encrypted payload."""


class LedgerError(PrivacyError):
    """A missing, corrupted or inconsistent privacy ledger."""
