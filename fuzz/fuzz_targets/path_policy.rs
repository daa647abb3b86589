//! The path gate every network path passes: whatever it accepts is
//! relative, normalized, free of `..`, NUL and empty components, not
//! excluded, and canonical (checking it again gives the same path).
#![no_main]

use clusterd::core::paths::{check_incoming, Filter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    // Compiled once: globset compilation would otherwise dominate each run.
    static FILTER: std::sync::OnceLock<Filter> = std::sync::OnceLock::new();
    let filter = FILTER.get_or_init(|| {
        Filter::new(
            &["*.lock".into(), ".ssh/".into(), "connection.cfg".into(), "/tmp/**".into()],
            &["*.lock".into()],
        )
        .expect("fixed patterns compile")
    });
    let is_dir = flags & 1 == 1;
    let Ok(path) = check_incoming(bytes, filter, is_dir) else {
        return;
    };
    let p = path.as_bytes();
    assert!(!p.is_empty());
    assert!(!p.starts_with(b"/") && !p.ends_with(b"/"));
    assert!(!p.contains(&0));
    for component in p.split(|b| *b == b'/') {
        assert!(!component.is_empty() && component != b"." && component != b"..");
    }
    assert!(!filter.is_excluded(&path, is_dir));
    let again = check_incoming(p, filter, is_dir).expect("an accepted path is accepted again");
    assert_eq!(again, path);
});
