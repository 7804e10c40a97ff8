//! xvdpa: a software vDPA datapath.
//!
//! A vhost-user-net backend whose guest queues are fed by AF_XDP sockets, with an XDP program
//! on the NIC steering each VM's frames to them by destination MAC.

pub mod datapath;
pub mod device;
pub mod mac;
