//! Tools to run real clusters on one machine: used by `blkrep demo`,
//! `blkrep bench` and the integration tests.

pub mod cluster;
pub mod nbd_client;
pub mod proxy;
pub mod replica_session;
pub mod rng;
pub mod standalone;
pub mod storm;
