"""Errors a user can cause. The CLI prints their one-line message and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad config key or value, missing file, unreachable resource, a locked output."""


class ConfigError(UserError):
    pass
