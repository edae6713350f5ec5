//! ember-memory (skeleton; being written).
