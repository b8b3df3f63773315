//! Simulator tests of the amoCRM connector.
