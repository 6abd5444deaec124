//! The sidecar as a process: its lifecycle (starting → ready → draining → stopped), its
//! listening sockets and their hand-over to a successor, publishing through the watchdog, the
//! two ways it stops, and giving memory back after a burst (free heap pages, code pages it does
//! not run).
//!
//! It may import `config`, `tls`, `http` and the shared modules; `stop` alone sees the
//! assembled [`crate::app::Sidecar`].

pub mod code;
pub mod delegate;
pub mod handover;
pub mod heap;
pub mod lifecycle;
pub mod listeners;
pub mod stop;
