//! Stream assignment: which stream goes on which connection, as a pure function of the
//! streams each open connection carries, the wanted set and the per-connection limit. Owns the
//! placement rules only; sending SUBSCRIBE/UNSUBSCRIBE and opening or closing sockets is the
//! stream manager's job.

use std::collections::BTreeSet;

/// What to do to go from the current assignment to the wanted set. Connections are indexes
/// into the `current` slice given to [`assign`]; stream lists are in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Streams to drop from a connection that keeps others.
    pub unsubscribe: Vec<(usize, Vec<String>)>,
    /// Connections left with no stream: closed (never refilled).
    pub close: Vec<usize>,
    /// Streams to add to a connection that has room.
    pub subscribe: Vec<(usize, Vec<String>)>,
    /// New connections, each with its streams.
    pub open: Vec<Vec<String>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.unsubscribe.is_empty()
            && self.close.is_empty()
            && self.subscribe.is_empty()
            && self.open.is_empty()
    }
}

/// The changes that make the streams carried by `current` equal `desired`, at most
/// `max_per_conn` per connection (at least 1 is assumed):
/// - a stream no longer desired is unsubscribed from its connection, and a connection left
///   empty is closed; untouched streams stay where they are;
/// - new streams, in name order, first fill the connections that stay open, in order, up to
///   the limit (room freed by removals included); the rest go on new connections of up to
///   `max_per_conn` streams each.
pub fn assign(
    current: &[BTreeSet<String>],
    desired: &BTreeSet<String>,
    max_per_conn: usize,
) -> Changes {
    let cap = max_per_conn.max(1);
    let mut changes = Changes::default();
    let mut sizes: Vec<Option<usize>> = Vec::with_capacity(current.len());
    for (i, streams) in current.iter().enumerate() {
        let gone: Vec<String> = streams
            .iter()
            .filter(|s| !desired.contains(*s))
            .cloned()
            .collect();
        let kept = streams.len() - gone.len();
        if gone.is_empty() {
            sizes.push(Some(kept));
        } else if kept == 0 {
            changes.close.push(i);
            sizes.push(None);
        } else {
            changes.unsubscribe.push((i, gone));
            sizes.push(Some(kept));
        }
    }
    let mut added = desired
        .iter()
        .filter(|s| !current.iter().any(|c| c.contains(*s)))
        .cloned()
        .peekable();
    for (i, size) in sizes.iter().enumerate() {
        let Some(size) = size else { continue };
        let room = cap.saturating_sub(*size);
        if room == 0 || added.peek().is_none() {
            continue;
        }
        changes
            .subscribe
            .push((i, added.by_ref().take(room).collect()));
    }
    let rest: Vec<String> = added.collect();
    changes.open = rest.chunks(cap).map(<[String]>::to_vec).collect();
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    struct Case {
        name: &'static str,
        current: Vec<BTreeSet<String>>,
        desired: BTreeSet<String>,
        max_per_conn: usize,
        expected: Changes,
    }

    #[test]
    fn streams_are_assigned_to_connections() {
        let cases = vec![
            Case {
                name: "nothing wanted, nothing open: nothing to do",
                current: vec![],
                desired: set(&[]),
                max_per_conn: 2,
                expected: Changes::default(),
            },
            Case {
                name: "the first streams open one connection",
                current: vec![],
                desired: set(&["b", "a"]),
                max_per_conn: 3,
                expected: Changes {
                    open: vec![list(&["a", "b"])],
                    ..Changes::default()
                },
            },
            Case {
                name: "more than the limit: full connections in name order, then the rest",
                current: vec![],
                desired: set(&["a", "b", "c", "d", "e"]),
                max_per_conn: 2,
                expected: Changes {
                    open: vec![list(&["a", "b"]), list(&["c", "d"]), list(&["e"])],
                    ..Changes::default()
                },
            },
            Case {
                name: "unchanged: nothing to do",
                current: vec![set(&["a", "b"]), set(&["c"])],
                desired: set(&["a", "b", "c"]),
                max_per_conn: 2,
                expected: Changes::default(),
            },
            Case {
                name: "new streams fill connections with room first, in connection order",
                current: vec![set(&["a", "b"]), set(&["c"]), set(&["d"])],
                desired: set(&["a", "b", "c", "d", "x", "y", "z"]),
                max_per_conn: 2,
                expected: Changes {
                    subscribe: vec![(1, list(&["x"])), (2, list(&["y"]))],
                    open: vec![list(&["z"])],
                    ..Changes::default()
                },
            },
            Case {
                name: "a removed stream is unsubscribed on its connection; the others stay",
                current: vec![set(&["a", "b"]), set(&["c", "d"])],
                desired: set(&["a", "c", "d"]),
                max_per_conn: 2,
                expected: Changes {
                    unsubscribe: vec![(0, list(&["b"]))],
                    ..Changes::default()
                },
            },
            Case {
                name: "a connection left empty is closed, not refilled",
                current: vec![set(&["a"]), set(&["b"])],
                desired: set(&["b", "c"]),
                max_per_conn: 2,
                expected: Changes {
                    close: vec![0],
                    subscribe: vec![(1, list(&["c"]))],
                    ..Changes::default()
                },
            },
            Case {
                name: "room freed by a removal takes a new stream on the same connection",
                current: vec![set(&["a", "b"])],
                desired: set(&["a", "c"]),
                max_per_conn: 2,
                expected: Changes {
                    unsubscribe: vec![(0, list(&["b"]))],
                    subscribe: vec![(0, list(&["c"]))],
                    ..Changes::default()
                },
            },
            Case {
                name: "everything removed: every connection closes",
                current: vec![set(&["a", "b"]), set(&["c"])],
                desired: set(&[]),
                max_per_conn: 2,
                expected: Changes {
                    close: vec![0, 1],
                    ..Changes::default()
                },
            },
            Case {
                name: "all connections full: a new one opens",
                current: vec![set(&["a", "b"])],
                desired: set(&["a", "b", "c"]),
                max_per_conn: 2,
                expected: Changes {
                    open: vec![list(&["c"])],
                    ..Changes::default()
                },
            },
            Case {
                name: "several removals on one connection are one unsubscribe, in name order",
                current: vec![set(&["a", "b", "c", "d"])],
                desired: set(&["b"]),
                max_per_conn: 4,
                expected: Changes {
                    unsubscribe: vec![(0, list(&["a", "c", "d"]))],
                    ..Changes::default()
                },
            },
        ];
        for c in cases {
            let got = assign(&c.current, &c.desired, c.max_per_conn);
            assert_eq!(got, c.expected, "case: {}", c.name);
            assert_eq!(
                got.is_empty(),
                c.expected == Changes::default(),
                "case: {}",
                c.name
            );
        }
    }
}
