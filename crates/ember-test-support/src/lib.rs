//! ember-test-support (skeleton; being written).
