//! ACPI power-management registers (sleep control/status, reset) for hardware-reduced ACPI (being written).
