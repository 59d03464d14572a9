//! Ferry's one HTTP stack (ADR 0059).
//!
//! - [`client`]: every HTTP client Ferry uses to reach a control plane (XenAPI today, vSphere
//!   and WS-Management next) is an [`HttpClient`]: `reqwest` on rustls with the source's trust
//!   ([`ferry_tls::Trust`]: a pinned fingerprint, a CA bundle, the system roots or, in labs,
//!   nothing), connection reuse, connect and read timeouts, proxies from the environment or the
//!   source's config, a user agent naming Ferry's version, optional cookie sessions, gzip, and
//!   errors that name the source, the host and what failed — never a URL's query (it may carry a
//!   session).
//! - [`server`]: every HTTP server (simulators, later the appliance's API and console) is an
//!   `axum::Router` run by [`Server`]: hyper's HTTP/1 and HTTP/2 connections, optional TLS,
//!   keep-alive, chunked bodies, a connection counter, and a shutdown that lets requests finish
//!   for a grace period and then drops what is left.
//!
//! No HTTP is written or parsed by hand anywhere else in Ferry.

pub mod client;
pub mod server;

pub use client::{ClientOptions, HttpClient, HttpError, ProxySetting};
pub use server::{Connection, Server};

/// `ferry/VERSION`, sent as the user agent and the server header.
pub const USER_AGENT: &str = concat!("ferry/", env!("CARGO_PKG_VERSION"));
