//! chatbus kafka component (being built).
