//! CPU templates: named CPUID/MSR masks applied on top of what KVM supports (being written).
