//! Building request bodies: [`empty`], [`full`], or any `http_body::Body` through
//! [`crate::Client::send`]. Responses come back as [`BoxBody`].

pub use detour_core::body::{BoxBody, BoxError, empty, full};
