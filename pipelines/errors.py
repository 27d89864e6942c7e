"""Errors a user can cause. The CLI prints their one-line message and exits 2."""

from __future__ import annotations

from curators.base import ResourceError, UserError


class ConfigError(UserError):
    """A config key or value that cannot be used."""


class PartialFailure(Exception):
    """Some units of work failed; the rest is committed and a re-run retries the failed ones.
    The CLI prints its one line and exits 1."""


__all__ = ["ConfigError", "PartialFailure", "ResourceError", "UserError"]
