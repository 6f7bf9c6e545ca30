//! Resolution (work in progress).
