"""Daemon settings: flags win over /etc/netd/daemon.json (Docker's keys), which win over defaults."""

import argparse
import json

import pytest

from netd.api.daemon import load_settings
from netd.contract.errors import BadRequest


def args(**flags):
    defaults = {"config_file": None, "run_dir": None, "data_dir": None, "store": None, "cluster_store": None,
                "cluster_advertise": None, "host_ttl": None, "reclaim_after": None, "debug": False}
    return argparse.Namespace(**{**defaults, **flags})


def write(tmp_path, data) -> str:
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_daemon_json_gives_the_cluster_settings(tmp_path):
    path = write(tmp_path, {"cluster-store": "etcd://10.0.0.13:2379", "cluster-advertise": "10.0.0.11"})
    settings = load_settings(args(config_file=path))
    assert (settings.cluster_store, settings.cluster_advertise) == ("etcd://10.0.0.13:2379", "10.0.0.11")
    assert settings.run_dir == "/run/netd"


def test_flags_win_over_the_file(tmp_path):
    path = write(tmp_path, {"cluster-store": "etcd://10.0.0.13:2379", "cluster-advertise": "10.0.0.11"})
    settings = load_settings(args(config_file=path, cluster_advertise="10.0.0.12", run_dir="/tmp/x"))
    assert settings.cluster_advertise == "10.0.0.12" and settings.run_dir == "/tmp/x"


@pytest.mark.parametrize("data, message", [
    ({"cluster-stor": "etcd://x:1"}, "unknown setting 'cluster-stor'"),
    ({"cluster-advertise": "10.0.0.1"}, "--cluster-advertise needs --cluster-store"),
    ({"cluster-store": "etcd://x:1"}, "--cluster-store needs --cluster-advertise"),
    ({"cluster-store": "etcd://x:1", "cluster-advertise": "eth0"}, "is not an IPv4 address"),
])
def test_bad_settings_say_what_is_wrong(tmp_path, data, message):
    with pytest.raises(BadRequest, match=message):
        load_settings(args(config_file=write(tmp_path, data)))


def test_unreadable_json_is_reported(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text("{not json")
    with pytest.raises(BadRequest, match="cannot read"):
        load_settings(args(config_file=str(path)))
