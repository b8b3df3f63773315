//! Wire-faithful simulators of the Rally, Marketo and amoCRM company APIs, for tests, the
//! demo and benchmarks. They listen on loopback only.

pub mod amocrm;
pub mod common;
