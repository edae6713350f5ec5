//! ember-devices (skeleton; being written).
