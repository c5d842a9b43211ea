"""netd: a container networking daemon (Docker's network model, across many hosts)."""

__version__ = "0.1.0"
API_VERSION = "1.0"
