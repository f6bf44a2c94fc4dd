//! herald's client protocol and room model.
//!
//! The wire protocol on `/ws/` is High-templar 3.x's, with its bugs fixed and a few extensions; everything that
//! turns client bytes into meaning, and meaning back into bytes, lives here and has no I/O.
//!
//! # Layout
//! - [`room`]: rooms as canonical JSON objects of scalars; the permission rule and the delivery rule.
//! - [`index`]: the matching index from published rooms to subscribed rooms.
//! - [`cmd`]: one enum of client commands, each in its own file (`ping`, `subscribe`, `unsubscribe`, `status`).
//! - [`request_id`]: the client's subscription handles.
//! - [`reply`]: error codes, replies, the auth frame, and the delivery encoder.

pub mod cmd;
pub mod index;
pub mod reply;
pub mod request_id;
pub mod room;

pub use cmd::{Command, ProtocolError};
pub use index::RoomIndex;
pub use reply::{DeliveryTemplate, ErrorCode};
pub use request_id::RequestId;
pub use room::{Room, RoomError, Scalar};
