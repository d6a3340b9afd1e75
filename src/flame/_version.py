"""The package version, kept in one place (also compared at the runner handshake)."""

__version__ = "0.1.0"
