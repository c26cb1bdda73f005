//! End-to-end tests: real `chat-server`s (in process, or as child
//! processes when a test must kill one) and real `chat-client`s over QUIC on
//! 127.0.0.1. One test binary, so the workspace links once.

// Helpers are `pub` for the sibling test modules; nothing is exported.
#![allow(unreachable_pub)]

#[macro_use]
mod harness;

mod auth;
mod backends;
mod calls;
mod friends;
mod groups;
mod loadgen;
mod messaging;
mod notifications;
mod operations;
mod photos;
mod presence;
mod robustness;
