"""Watching and steering a machine from outside: gdb, QMP, the interrupt stepper.

Each is a run-loop agent (:mod:`.agents`): it sees the machine between
guest runs, on the machine's thread. ``gdbstub`` and ``gdb/`` speak gdb's
remote protocol, ``qmp`` QEMU's monitor protocol (both over
``sockserver``), ``stepper`` stops at every interrupt event.
"""
