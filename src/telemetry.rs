//! Log output: `tracing` with the level from `RUST_LOG` (else a default).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to stderr; `default_level` applies
/// when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a person at a terminal, and never when NO_COLOR is set.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text if ansi => builder.init(),
        LogFormat::Text => builder.fmt_fields(PlainFields).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// The fields of uncoloured text lines, laid out as tracing-subscriber's
/// default does (`name=value` apart by spaces, the message first and
/// without its name, control characters in it escaped), without the
/// styling the default applies to every name even with colours off: that
/// is about a third of what an access line costs to write.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    empty: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let error = Escaped(format_args!("{value}"));
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!("{error:?} {}.sources={}", field.name(), Sources(source)),
            ),
            None => self.record_debug(field, &format_args!("{error:?}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        // Metadata of records from the `log` crate, already in the line's head.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self.result.and_then(|()| match name {
            "message" => write!(self.writer, "{:?}", Escaped(value)),
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.writer, "{name}={value:?}")
            }
        });
    }
}

/// An error's sources as a list, each escaped.
struct Sources<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut current = Some(self.0);
        while let Some(error) = current {
            list.entry(&Escaped(format_args!("{error}")));
            current = error.source();
        }
        list.finish()
    }
}

/// Writes `T`'s `Debug` with the control characters a terminal acts on
/// (ESC, BEL, BS, FF, DEL and the C1 range) escaped, so that a logged
/// message cannot drive the terminal that shows it.
struct Escaped<T>(T);

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{:?}", self.0)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Runs without a control character are written whole.
        let mut rest = text;
        while let Some(at) = rest.find(is_terminal_control) {
            self.0.write_str(&rest[..at])?;
            let control = rest[at..].chars().next().expect("found at this index");
            match control {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", u32::from(control))?;
                }
                _ => write!(self.0, "\\u{{{:x}}}", u32::from(control))?,
            }
            rest = &rest[at + control.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn is_terminal_control(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer \u{1b}[31mfailure")]
    struct Outer(#[source] std::io::Error);

    /// Every kind of field the proxy and its dependencies log.
    fn log_everything() {
        let peer: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        tracing::info!(
            target: "access",
            request_id = "ab\"c\u{1b}d",
            account = "",
            method = %http::Method::GET,
            status = 200u16,
            signed = -3i64,
            duration_ms = 0.25f64,
            retried = false,
            bytes_in = Some(12u64),
            missing = None::<u64>,
            r#type = "raw name",
            "request"
        );
        tracing::warn!(%peer, "a message with \u{1b}]0;title\u{7} and \u{85} in it, {}", 42);
        let error = Outer(std::io::Error::other("inner \u{9b}cause"));
        tracing::error!(
            error = &error as &(dyn std::error::Error + 'static),
            "failed"
        );
        tracing::debug!(error = %error, "displayed");
        tracing::info!("");
    }

    fn render<N>(fields: N) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, log_everything);
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn plain_fields_write_what_the_default_writes_without_colours() {
        let plain = render(PlainFields);
        assert_eq!(plain, render(DefaultFields::new()));
        assert_eq!(plain.lines().count(), 5, "{plain}");
        // The message and `Debug` values are escaped; a `Display` value is
        // written as it is, as the default writes it.
        let escaped: String = plain.lines().take(3).collect();
        assert!(
            !escaped.contains(['\u{1b}', '\u{7}', '\u{85}', '\u{9b}']),
            "{plain}"
        );
        assert!(
            plain.contains("with \\x1b]0;title\\x07 and \\u{85} in it, 42"),
            "{plain}"
        );
    }
}
