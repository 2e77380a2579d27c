//! The replication link: one QUIC connection per peer node.

pub mod wire;
