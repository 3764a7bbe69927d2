//! Network tests (placeholder).
