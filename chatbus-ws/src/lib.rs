//! chatbus ws component (being built).
