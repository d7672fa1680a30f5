"""`lineside demo`: the whole loop on one machine (see ``command``)."""

from lineside.demo.command import demo

__all__ = ["demo"]
