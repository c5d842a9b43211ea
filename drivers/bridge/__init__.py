from drivers.bridge.driver import BridgeDriver

__all__ = ["BridgeDriver"]
