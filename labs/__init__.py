"""Mininet labs of netd hosts (`python -m labs --help`): topologies and scripted scenarios that
prove containers on different hosts reach each other, ending in a table."""
