from drivers.bridge.driver import BridgeDriver

DRIVER = BridgeDriver
