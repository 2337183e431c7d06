//! The library half of the `kvsync` command-line tool: reading manifests strictly and within
//! limits ([`manifest`], [`strict`]), and the [`Usage`] error that makes the tool exit with 2.
//! The binary (`src/main.rs`) holds the commands; this part is what the fuzz targets and the
//! property tests reach.

pub mod manifest;
pub mod strict;
pub mod yaml11;

/// A usage error: the command line names something wrong (a kind, a name, a namespace, a
/// missing argument, a limit that is not a number). The binary exits with 2 for it, as clap
/// does for its own, and 1 for the rest.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A [`Usage`] error.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(message.into()))
}
