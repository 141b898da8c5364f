//! PostgreSQL store for chatbus. (Docs: see below.)

mod apply;
mod claim;
mod config;
mod convert;
mod error;
mod migrate;
mod query;
mod store;

pub use config::PostgresConfig;
pub use store::PostgresStore;
/// The driver, re-exported so that applications use the version this crate was built with.
pub use tokio_postgres;
