"""The parts of the gdb remote stub; :mod:`xenicorn.debug.gdbstub` puts them together.

``protocol`` (the wire format and its hardened reader), ``target`` (the
register layout and target description), ``memory`` (linear addresses
through the guest's page tables), ``threads`` (one gdb thread per vCPU)
and ``session`` (what each packet does).
"""
