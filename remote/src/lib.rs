//! The S3 remote tier (see DESIGN.md).
