//! Conformance tests of the Rally simulator.
