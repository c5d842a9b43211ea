from drivers.hostgw.driver import HostgwDriver

DRIVER = HostgwDriver
