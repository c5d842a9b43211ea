from drivers.overlay.driver import OverlayDriver

DRIVER = OverlayDriver
