"""netd's key layout in the local and cluster stores: every prefix, written once.

Drivers never see this: each gets its own folder (`driver_folder`) as a store of its own.
"""

ROOT = "netd/"
NETWORKS = ROOT + "networks/"                 # <network id> -> Network
NETWORK_NAMES = ROOT + "network-names/"       # <name> -> network id
ENDPOINTS = ROOT + "endpoints/"               # <network id>/<endpoint id> -> Endpoint
ENDPOINT_NAMES = ROOT + "endpoint-names/"     # <network id>/<name> -> endpoint id (global networks)
CONTAINERS = ROOT + "containers/"             # <container id> -> Container (local store)
CONTAINER_NAMES = ROOT + "container-names/"   # <name> -> container id
OWN_ENDPOINTS = ROOT + "own-endpoints/"       # <network id>/<endpoint id>: this host's endpoints on global
                                              # networks, kept locally too (local store): what to claim back
LOCAL_SUBNETS = ROOT + "local-subnets/"       # <host key>/<network id> -> {"Name", "Subnet"}: local networks
                                              # subnets, so that global pools avoid them (cluster store)
HOSTS = ROOT + "hosts/"                       # <host key> -> live member (under a lease)
HOST_RECORDS = ROOT + "host-records/"         # <host key> -> every host ever seen
IPAM = ROOT + "ipam/"                         # pools/, subnets/, addresses/ (netd.core.ipam)
CNI_ATTACHMENTS = ROOT + "cni/attachments/"   # <CNI network name>/<container id>/<ifname> -> what a CNI
                                              # ADD made (netd.core.cni; local store)
TRACE_REQUESTS = ROOT + "trace/requests/"     # <host>/<trace id>
TRACE_RESULTS = ROOT + "trace/results/"       # <trace id>/<host>
TRACE_STOPS = ROOT + "trace/stop/"            # <trace id>


def driver_folder(driver: str) -> str:
    """The folder of the stores that belongs to one driver (e.g. netd/hostgw/)."""
    return f"{ROOT}{driver}/"


def endpoint_name_key(network_id: str, name: str) -> str:
    return f"{ENDPOINT_NAMES}{network_id}/{name}"
DOCKER_NETWORKS = ROOT + "docker/networks/"     # <dockerd's network id> -> netd network id (local store)
DOCKER_USERS = ROOT + "docker/users/"           # <netd network id>/<host key>: hosts whose dockerd uses it
