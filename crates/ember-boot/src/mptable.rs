//! Intel MultiProcessor Specification table for kernels built without ACPI (being written).
