//! chatbus redis component (being built).
