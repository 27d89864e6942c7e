"""Stage orchestration: config, executors (local, Ray), the curation stages, resume, CLI."""

__version__ = "0.1.0"
