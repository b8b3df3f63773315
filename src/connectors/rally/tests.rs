//! Tests of the Rally connector against the simulator.
