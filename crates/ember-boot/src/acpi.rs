//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) written into guest memory (being written).
