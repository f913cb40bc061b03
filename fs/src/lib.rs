//! FUSE adapter (see DESIGN.md).
