//! ember-boot (skeleton; being written).
