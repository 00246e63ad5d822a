//! Request paths: dot segments are resolved (RFC 3986 §5.2.4) before a
//! client's path is joined to an upstream's base path, so that no path can
//! climb out of the configured prefix. Many servers decode `%2e` to `.`
//! before they resolve, so an encoded dot counts as a dot here too.

use std::borrow::Cow;

/// A segment that names the current (`.`) or the parent (`..`) directory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dot {
    Current,
    Parent,
}

fn dot(segment: &str) -> Option<Dot> {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        match rest {
            [b'.', tail @ ..] => rest = tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => rest = tail,
            _ => return None,
        }
        dots += 1;
    }
    match dots {
        1 => Some(Dot::Current),
        2 => Some(Dot::Parent),
        _ => None,
    }
}

/// Whether `path` has a `.` or `..` segment, plain or percent-encoded.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| dot(segment).is_some())
}

/// Whether `path` holds a percent-encoded `/` or `\`, which a server may
/// decode into a separator after the proxy has resolved the dot segments.
pub fn has_encoded_separator(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && (w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
            || (w[0] == b'%' && w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c'))
    })
}

/// `path` with its dot segments resolved; borrowed when it has none (the
/// common case costs one scan). A `..` at the top stays at the top.
pub fn without_dot_segments(path: &str) -> Cow<'_, str> {
    let Some(relative) = path.strip_prefix('/') else {
        return Cow::Borrowed(path);
    };
    if !has_dot_segment(relative) {
        return Cow::Borrowed(path);
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_directory = false;
    for segment in relative.split('/') {
        ends_in_directory = true;
        match dot(segment) {
            Some(Dot::Current) => {}
            Some(Dot::Parent) => {
                kept.pop();
            }
            None => {
                kept.push(segment);
                ends_in_directory = false;
            }
        }
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in &kept {
        resolved.push('/');
        resolved.push_str(segment);
    }
    if ends_in_directory || kept.is_empty() {
        resolved.push('/');
    }
    Cow::Owned(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_resolved_as_rfc_3986_says() {
        for (path, resolved) in [
            ("/G2M/rest/meetings", "/G2M/rest/meetings"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/c", "/a/..b/c"),
            ("/file.json", "/file.json"),
            ("//a/../b", "//b"),
            ("*", "*"),
        ] {
            assert_eq!(without_dot_segments(path), resolved, "{path}");
        }
    }

    #[test]
    fn encoded_separators_are_found_in_any_case() {
        assert!(has_encoded_separator("/a/..%2fb"));
        assert!(has_encoded_separator("/a/%2F"));
        assert!(has_encoded_separator("/a/%5cb"));
        assert!(!has_encoded_separator("/a/%25/b"));
        assert!(!has_encoded_separator("/a/b"));
    }
}
