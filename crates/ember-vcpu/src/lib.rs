//! ember-vcpu (skeleton; being written).
