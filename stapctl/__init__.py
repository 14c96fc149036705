"""stapctl: compile SystemTap probes once, run them on many hosts over SSH."""

__version__ = "0.1.0"
