"""syncer: keeps Tray.io workflows told which users are in which audiences."""

__version__ = "0.1.0"
