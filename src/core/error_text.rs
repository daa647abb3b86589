//! How an error is printed: its message followed by its causes, on one line,
//! as every refusal and log line shows it (one sentence naming what failed
//! and why, down to the OS error).

/// An error and its causes in one line ("a: b: c"), skipping a cause whose
/// text the line already carries (wrappers often repeat their source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `head` followed by the chain of causes starting at `source`.
pub fn with_causes(head: String, mut source: Option<&dyn std::error::Error>) -> String {
    let mut text = head;
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}
