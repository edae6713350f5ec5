//! Ember facade (being written).
