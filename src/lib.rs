//! goto-auth-proxy: a reverse proxy that adds an always-fresh GoTo OAuth
//! access token to every request, refreshes it ahead of expiry and after a
//! 401, and never loses a rotated refresh token.
//!
//! The binary is a thin shell around [`app::run`]; tests call the same
//! function with listeners on `127.0.0.1:0` and a shutdown signal they control.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod app;
pub mod bench;
pub mod ca;
pub mod cli;
pub mod config;
pub mod demo;
pub mod front;
pub mod login;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod standin;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod token;
