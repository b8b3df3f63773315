//! The long-running service around the engine: metrics and health endpoint, systemd
//! notifications, signal handling and graceful shutdown.

pub mod logging;
pub mod metrics;
pub mod server;
pub mod service;
