"""The contract every layer may import: the driver interface, the model, the errors, the version."""

VERSION = "0.1.0"
API_VERSION = "1.0"
