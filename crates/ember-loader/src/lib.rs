//! ember-loader (skeleton; being written).
