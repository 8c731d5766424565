//! Which egress serves the next request, as a pure function of plain data: the pool's members
//! and the direct connection as [`Candidate`]s, `app.proxy.mode` and `allow_direct`. Owns the
//! selection rules and the "why nothing is usable" message; gathering the candidates (clock,
//! governors, locks) and waiting for one to become usable is the pool's job, not this module's.

use crate::config::ProxyMode;

/// What selection needs to know about one egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `host:port`, or `direct`.
    pub name: String,
    /// Out of rotation right now (quarantined, or banned by a 418).
    pub quarantined: bool,
    /// Failed the request being placed (a proxy that failed is also quarantined; once its
    /// quarantine lapses it may serve the request again — only the direct egress stays out).
    pub excluded: bool,
    /// Its governor holds requests right now (a 429 pause, a 418 ban, a 403/451 block).
    pub held: bool,
    /// Weight left in its governor's window.
    pub remaining: u32,
    /// The last error seen through it (for the reason).
    pub last_error: String,
}

/// The pool's settings that selection depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub mode: ProxyMode,
    pub allow_direct: bool,
}

/// The outcome of [`select`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The member at this index of `proxies`.
    Proxy(usize),
    Direct,
    /// Nothing usable now, and why (one clause per egress, `; `-separated).
    None(String),
}

/// The egress for the next request:
/// - mode `never`: only the direct egress; `always`: only proxies; `auto`: proxies, and the
///   direct egress only when no proxy is usable and `allow_direct` is set;
/// - a quarantined proxy is not usable; the direct egress is not usable once it failed this
///   request;
/// - among the usable ones, those whose governor is not holding requests win, then the one
///   with the most weight left; on a tie the later one in `proxies` order.
pub fn select(rules: Rules, proxies: &[Candidate], direct: &Candidate) -> Choice {
    let usable: Vec<(usize, &Candidate)> = if rules.mode == ProxyMode::Never {
        Vec::new()
    } else {
        proxies
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.quarantined)
            .collect()
    };
    let direct_ok = match rules.mode {
        ProxyMode::Never => true,
        ProxyMode::Always => false,
        ProxyMode::Auto => rules.allow_direct,
    };
    // `max_by_key` keeps the last of equal keys.
    let best = usable
        .iter()
        .max_by_key(|(_, c)| (!c.held, c.remaining))
        .map(|(i, _)| Choice::Proxy(*i));
    match best {
        Some(choice) => choice,
        None if direct_ok && !direct.excluded => Choice::Direct,
        None => Choice::None(why_none(rules, proxies, direct)),
    }
}

/// Why no egress is usable: every proxy's state, then what keeps the direct egress out.
fn why_none(rules: Rules, proxies: &[Candidate], direct: &Candidate) -> String {
    if rules.mode == ProxyMode::Always && proxies.is_empty() {
        return "app.proxy.mode is always but proxy_config has no enabled proxy".to_string();
    }
    let mut parts: Vec<String> = proxies
        .iter()
        .map(|c| {
            if c.quarantined {
                format!("{} quarantined ({})", c.name, c.last_error)
            } else if c.excluded {
                format!("{} failed this request ({})", c.name, c.last_error)
            } else {
                format!("{} usable", c.name)
            }
        })
        .collect();
    if !rules.allow_direct && rules.mode == ProxyMode::Auto {
        parts.push("direct not allowed (app.proxy.allow_direct: false)".to_string());
    } else if direct.excluded {
        parts.push(format!("direct failed ({})", direct.last_error));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(name: &str) -> Candidate {
        Candidate {
            name: name.to_string(),
            quarantined: false,
            excluded: false,
            held: false,
            remaining: 100,
            last_error: String::new(),
        }
    }

    fn direct() -> Candidate {
        proxy("direct")
    }

    fn quarantined(name: &str, why: &str) -> Candidate {
        Candidate {
            quarantined: true,
            last_error: why.to_string(),
            ..proxy(name)
        }
    }

    fn with_remaining(name: &str, remaining: u32) -> Candidate {
        Candidate {
            remaining,
            ..proxy(name)
        }
    }

    fn held(name: &str, remaining: u32) -> Candidate {
        Candidate {
            held: true,
            remaining,
            ..proxy(name)
        }
    }

    fn failed_direct(why: &str) -> Candidate {
        Candidate {
            excluded: true,
            last_error: why.to_string(),
            ..direct()
        }
    }

    const AUTO: Rules = Rules {
        mode: ProxyMode::Auto,
        allow_direct: true,
    };
    const AUTO_NO_DIRECT: Rules = Rules {
        mode: ProxyMode::Auto,
        allow_direct: false,
    };
    const ALWAYS: Rules = Rules {
        mode: ProxyMode::Always,
        allow_direct: true,
    };
    const NEVER: Rules = Rules {
        mode: ProxyMode::Never,
        allow_direct: false,
    };

    struct Case {
        name: &'static str,
        rules: Rules,
        proxies: Vec<Candidate>,
        direct: Candidate,
        expected: Choice,
    }

    #[test]
    fn selection_rules() {
        let cases = vec![
            Case {
                name: "no proxies, auto: direct",
                rules: AUTO,
                proxies: vec![],
                direct: direct(),
                expected: Choice::Direct,
            },
            Case {
                name: "a usable proxy is preferred to direct in auto mode",
                rules: AUTO,
                proxies: vec![with_remaining("a:1", 1)],
                direct: with_remaining("direct", 1000),
                expected: Choice::Proxy(0),
            },
            Case {
                name: "the proxy with the most weight left wins",
                rules: AUTO,
                proxies: vec![
                    with_remaining("a:1", 10),
                    with_remaining("b:1", 90),
                    with_remaining("c:1", 50),
                ],
                direct: direct(),
                expected: Choice::Proxy(1),
            },
            Case {
                name: "a tie goes to the later proxy",
                rules: AUTO,
                proxies: vec![with_remaining("a:1", 50), with_remaining("b:1", 50)],
                direct: direct(),
                expected: Choice::Proxy(1),
            },
            Case {
                name: "a held proxy loses to a free one with less weight left",
                rules: AUTO,
                proxies: vec![held("a:1", 1000), with_remaining("b:1", 1)],
                direct: direct(),
                expected: Choice::Proxy(1),
            },
            Case {
                name: "held proxies still serve when nothing else is usable",
                rules: AUTO,
                proxies: vec![held("a:1", 5), held("b:1", 7)],
                direct: direct(),
                expected: Choice::Proxy(1),
            },
            Case {
                name: "a quarantined proxy is skipped",
                rules: AUTO,
                proxies: vec![
                    quarantined("a:1", "proxy failed"),
                    with_remaining("b:1", 1),
                ],
                direct: direct(),
                expected: Choice::Proxy(1),
            },
            Case {
                name: "an excluded but no longer quarantined proxy may serve again",
                rules: AUTO,
                proxies: vec![Candidate {
                    excluded: true,
                    ..proxy("a:1")
                }],
                direct: direct(),
                expected: Choice::Proxy(0),
            },
            Case {
                name: "all proxies quarantined, auto with allow_direct: direct",
                rules: AUTO,
                proxies: vec![quarantined("a:1", "x")],
                direct: direct(),
                expected: Choice::Direct,
            },
            Case {
                name: "all proxies quarantined, direct not allowed: none, saying both",
                rules: AUTO_NO_DIRECT,
                proxies: vec![quarantined("a:1", "proxy failed: refused")],
                direct: direct(),
                expected: Choice::None(
                    "a:1 quarantined (proxy failed: refused); direct not allowed (app.proxy.allow_direct: false)"
                        .to_string(),
                ),
            },
            Case {
                name: "direct that failed this request is not used again",
                rules: AUTO,
                proxies: vec![],
                direct: failed_direct("HTTP 451 through direct"),
                expected: Choice::None("direct failed (HTTP 451 through direct)".to_string()),
            },
            Case {
                name: "a held direct egress still serves",
                rules: AUTO,
                proxies: vec![],
                direct: Candidate {
                    held: true,
                    ..direct()
                },
                expected: Choice::Direct,
            },
            Case {
                name: "always never uses direct",
                rules: ALWAYS,
                proxies: vec![quarantined("a:1", "banned")],
                direct: direct(),
                expected: Choice::None("a:1 quarantined (banned)".to_string()),
            },
            Case {
                name: "always without proxies says the pool is empty",
                rules: ALWAYS,
                proxies: vec![],
                direct: direct(),
                expected: Choice::None(
                    "app.proxy.mode is always but proxy_config has no enabled proxy".to_string(),
                ),
            },
            Case {
                name: "always picks a proxy",
                rules: ALWAYS,
                proxies: vec![with_remaining("a:1", 3)],
                direct: with_remaining("direct", 1000),
                expected: Choice::Proxy(0),
            },
            Case {
                name: "never ignores usable proxies",
                rules: NEVER,
                proxies: vec![with_remaining("a:1", 1000)],
                direct: with_remaining("direct", 1),
                expected: Choice::Direct,
            },
            Case {
                name: "never with direct failed: none, proxies listed as they are",
                rules: NEVER,
                proxies: vec![
                    proxy("a:1"),
                    Candidate {
                        excluded: true,
                        last_error: "HTTP 403".to_string(),
                        ..proxy("b:1")
                    },
                ],
                direct: failed_direct("timeout"),
                expected: Choice::None(
                    "a:1 usable; b:1 failed this request (HTTP 403); direct failed (timeout)"
                        .to_string(),
                ),
            },
        ];
        for c in cases {
            assert_eq!(
                select(c.rules, &c.proxies, &c.direct),
                c.expected,
                "case: {}",
                c.name
            );
        }
    }
}
