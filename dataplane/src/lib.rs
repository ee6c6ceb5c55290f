//! ringmesh's native data plane (see the README's contract).
#![forbid(unsafe_code)]

#[cfg(feature = "python")]
mod binding;

pub mod body;
pub mod call;
pub mod driver;
pub mod grpc;
pub mod inbound;
pub mod log;
pub mod outbound;
pub mod plane;
pub mod pool;
pub mod relay;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod tls;
pub mod trace;

pub mod balance;
pub mod budget;
pub mod eject;
pub mod retry;
pub mod ring;
pub mod status;
pub mod timeout;
