"""The faces: the CLI and its client, the REST server and its views, the daemon entry point, error mapping."""
