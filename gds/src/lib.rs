//! GPU file I/O (see DESIGN.md).
