"""The contract every layer may import: the driver interface, the model, the errors, the version."""

VERSION = "0.1.0"
# The Docker Engine API versions netd's socket speaks (for networks): the docker CLI and docker-py
# negotiate with these.
API_VERSION = "1.41"
MIN_API_VERSION = "1.24"
