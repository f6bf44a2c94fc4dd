//! `ping` -> `pong`: the application-level keepalive High-templar clients send every 30 s.

/// The text `ping`. Its reply is the text `pong`, not JSON.
#[derive(Debug, Clone, Copy)]
pub struct Ping;

impl Ping {
    /// The reply text.
    pub const REPLY: &'static str = "pong";
}
