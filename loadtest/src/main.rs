//! Placeholder until the load tool lands.
fn main() {}
