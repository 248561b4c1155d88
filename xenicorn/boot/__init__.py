"""Getting a kernel into guest RAM and telling it about the machine: PVH, the Linux boot protocol, ACPI, MP table."""
