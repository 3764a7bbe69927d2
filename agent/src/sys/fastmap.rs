//! Hash maps keyed by paths and digests on the planning hot path: the
//! standard library's SipHash is DoS-resistant but several times slower on
//! the short byte keys a walk produces. foldhash keeps a per-process random
//! seed, so crafted file names in a root still cannot pick collisions ahead
//! of time.

/// A `HashMap` with foldhash's fast, randomly seeded hasher.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with foldhash's fast, randomly seeded hasher.
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
