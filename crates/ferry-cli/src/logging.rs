//! The one tracing subscriber of the `ferry` binary.
//!
//! What a person sees on the terminal is what they asked for: the command's own output (data on
//! stdout, summaries and progress on stderr, printed deliberately, never as log events) plus
//! warnings and errors. The log is behind flags (ADR 0060):
//!
//! | flags | stderr |
//! |---|---|
//! | `-q` | errors only; no progress bars or summaries |
//! | (none) | warnings and errors, as `warning: …` lines |
//! | `-v` | Ferry's info events, as timestamped log lines |
//! | `-vv` | Ferry's debug events (and other crates' warnings) |
//! | `-vvv` | Ferry's trace events and other crates' debug events |
//!
//! `RUST_LOG` replaces the stderr filter. `--log-format json` turns every log line into one
//! JSON object. `--log-file PATH` appends the log (at least Ferry's info events, more with
//! `-v`) to a file whatever the terminal shows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// True under `-q`: commands leave out progress bars and summaries (their data on stdout and
/// their errors stay).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The stderr filter for a verbosity (`-q` is -1).
fn stderr_directives(verbosity: i8) -> &'static str {
    // `ferry` matches the targets of every Ferry crate (`ferry`, `ferry_engine`, …): filter
    // targets are prefixes.
    match verbosity {
        i8::MIN..=-1 => "error",
        0 => "warn",
        1 => "warn,ferry=info",
        2 => "warn,ferry=debug",
        _ => "debug,ferry=trace",
    }
}

/// Installs the subscriber. Safe to call once per process.
pub fn init(
    verbose: u8,
    quiet: bool,
    format: LogFormat,
    log_file: Option<&Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    QUIET.store(quiet, Ordering::Relaxed);
    let verbosity: i8 = if quiet { -1 } else { verbose.min(3) as i8 };
    let stderr_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(stderr_directives(verbosity)));
    let stderr_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if verbosity <= 0 => tracing_subscriber::fmt::layer()
            .event_format(Plain)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::env::var_os("NO_COLOR").is_none() && is_terminal_stderr())
            .boxed(),
    }
    .with_filter(stderr_filter);
    let file_layer = match log_file {
        None => None,
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            let writer = std::sync::Mutex::new(file);
            let filter = EnvFilter::new(stderr_directives(verbosity.max(1)));
            Some(match format {
                LogFormat::Json => tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(writer)
                    .with_filter(filter)
                    .boxed(),
                LogFormat::Text => tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .with_filter(filter)
                    .boxed(),
            })
        }
    };
    // A second init (tests that call into main twice) is harmless; ignore it.
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    Ok(())
}

/// `warning: message key=value …`: how a warning reads at default verbosity, like the
/// `error: …` line of a failed command.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        let prefix = if level == Level::ERROR {
            "error"
        } else if level == Level::WARN {
            "warning"
        } else if level == Level::INFO {
            "info"
        } else if level == Level::DEBUG {
            "debug"
        } else {
            "trace"
        };
        write!(writer, "{prefix}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn is_terminal_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
