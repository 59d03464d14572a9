//! The one tracing subscriber of the `ferry` binary: stderr only, text or JSON, filtered by
//! `RUST_LOG` when set, otherwise by `--verbose`.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the subscriber. Safe to call once per process.
pub fn init(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn,ferry=info",
        1 => "info,ferry=debug",
        _ => "debug,ferry=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose > 0);
    // A second init (tests that call into main twice) is harmless; ignore it.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::env::var_os("NO_COLOR").is_none() && is_terminal_stderr())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

fn is_terminal_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
