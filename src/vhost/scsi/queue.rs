//! The virtio-scsi queues on the reactors (virtio 1.2 §5.6.6): the request queues
//! ([`command`]: SCSI commands to the bdevs, zero-copy, on the shared virtqueue engine),
//! the control queue ([`control`]: task management, asynchronous notification) and the
//! event queue ([`event`]: hot-plug events).

pub mod command;
pub mod control;
pub mod event;

pub use command::RequestQueue;
pub use control::ControlQueue;
pub use event::EventQueue;

#[cfg(test)]
mod restart_tests;
#[cfg(test)]
mod tests;
