"""The PC: wiring of devices and interrupt lines, the run loop that dispatches exits, guest RAM, the clock."""
