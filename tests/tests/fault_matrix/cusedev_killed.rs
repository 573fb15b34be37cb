//! Written in another branch.
