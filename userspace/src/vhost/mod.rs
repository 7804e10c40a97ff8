//! vhost-user serving: one VM port's socket and connection loop ([`port`]), the
//! `VhostUserBackend` over its queue-pair workers ([`backend`]), and the message filter in
//! front of rust-vmm's library ([`protocol_shim`]).

pub mod backend;
mod exit_events;
mod frontend_checks;
pub mod port;
pub mod protocol_shim;
mod single_copy;
pub mod socket_file;
