//! ember-vmm (skeleton; being written).
