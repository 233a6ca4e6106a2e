//! shard-core integration tests: the hub driven through its public API in a process of its
//! own (nextest runs each test in its own process, so RSS readings are this test's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod memory;
