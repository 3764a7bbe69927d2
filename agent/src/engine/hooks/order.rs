//! The order hooks run in (`sort -n` on their names, then the names) and
//! which names are hooks at all.

use std::cmp::Ordering;

use super::SKIP_BAD_NAME;

/// Splits directory entry names into the hooks that run, in `LC_ALL=C sort
/// -n` order, and those skipped for their name, each with the reason.
///
/// `sort -n` compares the leading number (an optional `-` then digits; none
/// counts as 0) numerically and breaks ties by comparing whole names byte by
/// byte, so `2-a` runs before `10-b` and `010` before `10`. Skipped names are
/// returned in byte order so warnings come out in a stable order.
pub fn order_hook_names(names: Vec<String>) -> (Vec<String>, Vec<(String, &'static str)>) {
    let (mut run, mut bad): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| is_valid_hook_name(n));
    run.sort_by(|a, b| compare_sort_n(a, b));
    bad.sort();
    let skipped = bad.into_iter().map(|n| (n, SKIP_BAD_NAME)).collect();
    (run, skipped)
}

/// Whether `name` matches [`HOOK_NAME_PATTERN`].
pub(super) fn is_valid_hook_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `LC_ALL=C sort -n` comparison of two lines.
pub(super) fn compare_sort_n(a: &str, b: &str) -> Ordering {
    leading_number(a)
        .cmp(&leading_number(b))
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// The leading number of a name, as `sort -n` reads it. Kept as a digit
/// string so that names like `99999999999999999999-x` cannot overflow.
#[derive(Debug, PartialEq, Eq)]
struct LeadingNumber<'a> {
    negative: bool,
    /// Digits without leading zeros; empty for zero.
    magnitude: &'a str,
}

fn leading_number(name: &str) -> LeadingNumber<'_> {
    let (negative, rest) = match name.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let magnitude = rest[..digits_end].trim_start_matches('0');
    LeadingNumber {
        // "-0" and "-x" are zero, and zero has no sign.
        negative: negative && !magnitude.is_empty(),
        magnitude,
    }
}

impl Ord for LeadingNumber<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        let abs = |n: &Self| (n.magnitude.len(), n.magnitude.as_bytes());
        match (self.negative, other.negative) {
            (false, false) => abs(self).cmp(&abs(other)),
            (true, true) => abs(other).cmp(&abs(self)),
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
        }
    }
}

impl PartialOrd for LeadingNumber<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
