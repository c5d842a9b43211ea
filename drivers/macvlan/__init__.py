from drivers.macvlan.driver import MacvlanDriver

DRIVER = MacvlanDriver
