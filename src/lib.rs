//! kvfs
