//! crmbridge: keeps company records in sync across Rally, Marketo and amoCRM through a
//! canonical model stored in redb.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod connector;
pub mod connectors;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod mapping;
pub mod model;
pub mod secret;
pub mod sim;
pub mod store;
