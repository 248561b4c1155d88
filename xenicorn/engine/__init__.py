"""The CPU engine: Unicorn, and everything that knows its private layout.

This is the only package that imports ``unicorn`` or ``ctypes``
(``tests/test_architecture.py`` holds it to that). Unicorn is QEMU's TCG
without the machine; xenicorn uses it as a hypervisor uses KVM, through a
small typed interface:

==================  =========================================================
module              what it gives the rest of xenicorn
==================  =========================================================
``startup``         :func:`probe`, the one start-up check, and
                    :class:`EngineUnsupported`, its one error
``vcpu``            :class:`~xenicorn.engine.vcpu.VCpu`: registers, MSRs,
                    ``cpu_state()``, ``run()`` returning typed exits, stops
``hooks``           the Unicorn hook → exit adaptors (the table of which
                    report becomes which exit is in ``vcpu``)
``delivery``        the interrupt window, interrupts the engine delivers
``memmap``          guest RAM, MMIO ranges and overlay pages in the engine
``tsc``             the host TSC, read and calibrated
``hostmem``         host addresses of Python buffers (for ``mem_map_ptr``)
``rawctx``          QEMU's ``CPUX86State`` fields Unicorn does not expose
``cpufeatures``     the engine CPU of a ``--cpu`` model: its feature words
``msr``             the SVM intercept window: RDMSR/WRMSR/RDTSC exits
``irqwindow``       the exact interrupt-window exit
``stopcheck``       stops between blocks; stops without ``stop_request``
``icount``          Unicorn's instruction counter
``stoptimer``       a host-time deadline for ``run()``
==================  =========================================================

Every private offset sits in the module whose self-test verifies it by
behaviour; :func:`probe` runs them all.
"""
from .startup import EngineInfo, EngineUnsupported, probe, reset_probe

__all__ = ["EngineInfo", "EngineUnsupported", "probe", "reset_probe"]
