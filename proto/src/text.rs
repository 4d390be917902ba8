//! Free text that crosses a process boundary, bounded: a rank's detail, a job's reason, a log
//! line, an error message. Text over its bound is cut at a character boundary and ends with a
//! visible marker saying how much was cut, so a report is never refused or lost whole for being
//! long, and a reader can tell a cut text from a complete one. Errors quote user input only as
//! a short [`excerpt`].

use std::borrow::Cow;

/// Longest error message a service returns, in bytes. gRPC carries it percent-encoded in a
/// header (up to 3 bytes per byte of non-ASCII text), and common clients refuse header blocks
/// over 8 KiB (gRPC core's soft limit; 16 KiB hard), so 2 KiB keeps every status readable.
pub const MAX_ERROR_BYTES: usize = 2048;

/// Longest excerpt of user input quoted in a message, in characters.
pub const EXCERPT_CHARS: usize = 48;

/// Returns `text` whole when it fits in `max_bytes`, else its longest prefix (at a character
/// boundary) followed by `… [N bytes cut]`, all within `max_bytes` (for `max_bytes` of at least
/// 32; below that, the prefix alone).
pub fn truncate(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    // The marker's length depends on how much is cut, which depends on the marker's length:
    // reserve room for the longest marker the text could need.
    let widest_marker = marker(text.len()).len();
    let Some(room) = max_bytes.checked_sub(widest_marker) else {
        return Cow::Owned(text[..floor_char_boundary(text, max_bytes)].to_owned());
    };
    let end = floor_char_boundary(text, room);
    let mut cut = String::with_capacity(max_bytes);
    cut.push_str(&text[..end]);
    cut.push_str(&marker(text.len() - end));
    Cow::Owned(cut)
}

/// A short, quoted excerpt of user input for an error message: the whole text when it is short,
/// else its first [`EXCERPT_CHARS`] characters and the total length (`"abc…" (70000 bytes)`).
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?} ({} bytes)", format!("{}…", &text[..end]), text.len()),
    }
}

/// The marker that ends a text cut by `cut_bytes`.
fn marker(cut_bytes: usize) -> String {
    format!("… [{cut_bytes} bytes cut]")
}

/// The largest character boundary of `text` at or below `index`.
pub fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut end = index.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_untouched() {
        assert!(matches!(truncate("hello", 5), Cow::Borrowed("hello")));
    }

    #[test]
    fn long_text_is_cut_within_the_bound_with_a_marker_counting_the_cut() {
        for length in [33, 100, 1_000, 100_000] {
            let text = "é".repeat(length);
            for bound in [32, 40, 64, 1024] {
                let cut = truncate(&text, bound);
                if text.len() <= bound {
                    continue;
                }
                assert!(cut.len() <= bound, "{} > {bound}", cut.len());
                let (kept, marker) = cut.split_once('…').expect("a marker");
                assert!(kept.chars().all(|c| c == 'é'), "{cut}");
                let counted: usize = marker
                    .trim_start_matches(" [")
                    .trim_end_matches(" bytes cut]")
                    .parse()
                    .unwrap();
                assert_eq!(kept.len() + counted, text.len(), "{cut}");
            }
        }
    }

    #[test]
    fn a_tiny_bound_keeps_only_a_prefix() {
        assert_eq!(truncate("abcdefgh", 3), "abc");
    }

    #[test]
    fn excerpts_are_short_and_say_how_long_the_input_was() {
        assert_eq!(excerpt("key"), "\"key\"");
        let long = "k".repeat(70_000);
        let quoted = excerpt(&long);
        assert!(quoted.len() < 80, "{quoted}");
        assert!(quoted.ends_with("(70000 bytes)"), "{quoted}");
    }
}
