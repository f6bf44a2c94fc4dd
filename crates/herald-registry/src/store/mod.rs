//! Durable raft storage (in progress).
