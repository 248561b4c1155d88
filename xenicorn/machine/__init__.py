"""The PC around the vCPUs: RAM, buses, interrupt wiring, devices, the run loop.

``Machine`` and ``MachineConfig`` live in :mod:`.machine`; the parts each
have a module of their own (see its docstring).
"""
from .machine import Machine, MachineConfig

__all__ = ["Machine", "MachineConfig"]
