//! Tests of the amoCRM simulator against its HTTP surface.
