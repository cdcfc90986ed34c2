//! Typed configuration values: the kinds a key can have, their parsers and canonical text forms.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// The type of a configuration key, with its bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    /// Free text (a host name, a URL, a cipher list); `max` bytes at most.
    Text {
        max: usize,
    },
    /// A filesystem path; must be absolute when not empty.
    Path,
    /// A byte size: `50M`, `10K`, `1G`, or a plain number of bytes.
    Size {
        min: u64,
        max: u64,
    },
    /// A duration: `30s`, `10m`, `1h`, `5d`, or a plain number of seconds.
    Duration {
        min: Duration,
        max: Duration,
    },
    /// Events per period: `10/minute`, `100/hour`, `5/s`.
    Rate,
    /// One IP address.
    Ip,
    /// A comma-separated list of IP addresses.
    IpList {
        v6: bool,
    },
    /// A comma-separated list of networks (`192.0.2.0/24`, `::1/128`, or bare addresses).
    CidrList,
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
    /// A comma-separated list of words chosen from a fixed set.
    EnumList(&'static [&'static str]),
    /// A comma-separated list of free words (domains, extensions).
    List,
    /// `system`, or a comma-separated list of `IP` / `IP:port` / `[IPv6]:port`.
    DnsServers,
}

impl Kind {
    /// The short name shown by `mb-config list`.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Bool => "bool",
            Kind::Int { .. } => "integer",
            Kind::Float { .. } => "number",
            Kind::Text { .. } => "text",
            Kind::Path => "path",
            Kind::Size { .. } => "size",
            Kind::Duration { .. } => "duration",
            Kind::Rate => "rate",
            Kind::Ip => "ip",
            Kind::IpList { .. } => "ip-list",
            Kind::CidrList => "cidr-list",
            Kind::Enum(_) => "enum",
            Kind::EnumList(_) => "enum-list",
            Kind::List => "list",
            Kind::DnsServers => "dns-servers",
        }
    }

    /// The allowed range in words, empty when there is none worth saying.
    pub fn range(&self) -> String {
        match self {
            Kind::Int { min, max } => format!("{min}..{max}"),
            Kind::Float { min, max } => format!("{min}..{max}"),
            Kind::Size { min, max } => format!("{}..{}", format_size(*min), format_size(*max)),
            Kind::Duration { min, max } => {
                format!("{}..{}", format_duration(*min), format_duration(*max))
            }
            Kind::Enum(words) | Kind::EnumList(words) => words.join("|"),
            Kind::Bool => "true|false".into(),
            Kind::Rate => "N/second|minute|hour|day".into(),
            Kind::DnsServers => "system|IP[:port],...".into(),
            Kind::Text { max } => format!("at most {max} bytes"),
            _ => String::new(),
        }
    }
}

/// A parsed configuration value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Size(u64),
    Duration(Duration),
    Rate(Rate),
    Ip(IpAddr),
    IpList(Vec<IpAddr>),
    CidrList(Vec<IpNet>),
    Word(String),
    List(Vec<String>),
    DnsServers(DnsServers),
}

/// A number of events allowed per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Where DNS questions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsServers {
    /// The servers of `/etc/resolv.conf`.
    System,
    List(Vec<std::net::SocketAddr>),
}

/// Why a text could not be parsed as a value of a kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ValueError> {
    Err(ValueError(msg.into()))
}

/// Longest value text, as given and as written back.
const MAX_TEXT: usize = 4096;

impl Value {
    /// Parses `text` as a value of `kind`, checking its range.
    pub fn parse(kind: &Kind, text: &str) -> Result<Value, ValueError> {
        let value = Self::parse_text(kind, text)?;
        // What is stored, shown and read back is the canonical form, which can be longer
        // than what was typed (`::` is written `::/128`): it must be acceptable too.
        let canonical = value.to_string().len();
        if canonical > MAX_TEXT {
            return err(format!(
                "value is longer than {MAX_TEXT} bytes once written in full ({canonical} bytes)"
            ));
        }
        Ok(value)
    }

    fn parse_text(kind: &Kind, text: &str) -> Result<Value, ValueError> {
        let t = text.trim();
        if t.len() > MAX_TEXT {
            return err(format!("value is longer than {MAX_TEXT} bytes"));
        }
        if t.chars().any(|c| c.is_control()) {
            return err("value contains a control character");
        }
        match kind {
            Kind::Bool => match t.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "off" | "0" => Ok(Value::Bool(false)),
                _ => err(format!("expected true or false, got {t:?}")),
            },
            Kind::Int { min, max } => {
                let n: i64 = t
                    .parse()
                    .or_else(|_| err(format!("expected a whole number, got {t:?}")))?;
                if n < *min || n > *max {
                    return err(format!("{n} is out of range {min}..{max}"));
                }
                Ok(Value::Int(n))
            }
            Kind::Float { min, max } => {
                let n: f64 = t
                    .parse()
                    .ok()
                    .filter(|n: &f64| n.is_finite())
                    .map_or_else(|| err(format!("expected a number, got {t:?}")), Ok)?;
                if n < *min || n > *max {
                    return err(format!("{n} is out of range {min}..{max}"));
                }
                Ok(Value::Float(n))
            }
            Kind::Text { max } => {
                if t.len() > *max {
                    return err(format!("longer than {max} bytes"));
                }
                Ok(Value::Text(t.to_string()))
            }
            Kind::Path => {
                if !t.is_empty() && !t.starts_with('/') {
                    return err(format!("expected an absolute path, got {t:?}"));
                }
                Ok(Value::Text(t.to_string()))
            }
            Kind::Size { min, max } => {
                let n = parse_size(t)?;
                if n < *min || n > *max {
                    return err(format!(
                        "{} is out of range {}..{}",
                        format_size(n),
                        format_size(*min),
                        format_size(*max)
                    ));
                }
                Ok(Value::Size(n))
            }
            Kind::Duration { min, max } => {
                let d = parse_duration(t)?;
                if d < *min || d > *max {
                    return err(format!(
                        "{} is out of range {}..{}",
                        format_duration(d),
                        format_duration(*min),
                        format_duration(*max)
                    ));
                }
                Ok(Value::Duration(d))
            }
            Kind::Rate => parse_rate(t).map(Value::Rate),
            Kind::Ip => parse_ip(t).map(Value::Ip),
            Kind::IpList { v6 } => {
                let ips = split_list(t).map(parse_ip).collect::<Result<Vec<_>, _>>()?;
                if let Some(bad) = ips.iter().find(|ip| ip.is_ipv6() != *v6) {
                    let want = if *v6 { "IPv6" } else { "IPv4" };
                    return err(format!("{bad} is not an {want} address"));
                }
                Ok(Value::IpList(ips))
            }
            Kind::CidrList => split_list(t)
                .map(parse_net)
                .collect::<Result<Vec<_>, _>>()
                .map(Value::CidrList),
            Kind::Enum(words) => {
                let w = t.to_ascii_lowercase();
                if words.contains(&w.as_str()) {
                    Ok(Value::Word(w))
                } else {
                    err(format!("expected one of {}, got {t:?}", words.join(", ")))
                }
            }
            Kind::EnumList(words) => {
                let mut out = Vec::new();
                for w in split_list(t) {
                    let w = w.to_ascii_lowercase();
                    if !words.contains(&w.as_str()) {
                        return err(format!(
                            "expected items from {}, got {w:?}",
                            words.join(", ")
                        ));
                    }
                    if !out.contains(&w) {
                        out.push(w);
                    }
                }
                Ok(Value::List(out))
            }
            Kind::List => Ok(Value::List(split_list(t).map(str::to_string).collect())),
            Kind::DnsServers => {
                if t.eq_ignore_ascii_case("system") {
                    return Ok(Value::DnsServers(DnsServers::System));
                }
                let list = split_list(t)
                    .map(parse_dns_server)
                    .collect::<Result<Vec<_>, _>>()?;
                if list.is_empty() {
                    return err("expected \"system\" or a list of servers");
                }
                Ok(Value::DnsServers(DnsServers::List(list)))
            }
        }
    }

    /// Converts a TOML value of the configuration file into the text form, then parses it.
    /// Arrays become comma lists, so `listen = ["192.0.2.1", "192.0.2.2"]` works.
    pub fn from_toml(kind: &Kind, v: &toml::Value) -> Result<Value, ValueError> {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s.clone()),
                        toml::Value::Integer(i) => parts.push(i.to_string()),
                        other => return err(format!("unexpected {} in a list", other.type_str())),
                    }
                }
                parts.join(",")
            }
            other => return err(format!("expected a value, got a {}", other.type_str())),
        };
        if matches!(kind, Kind::Bool) && !matches!(v, toml::Value::Boolean(_)) {
            return err(format!("expected true or false, got {text:?}"));
        }
        Value::parse(kind, &text)
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// The canonical text form: what `mb-config get` prints and the database stores.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(n) => write!(f, "{n:?}"),
            Value::Text(s) | Value::Word(s) => f.write_str(s),
            Value::Size(n) => f.write_str(&format_size(*n)),
            Value::Duration(d) => f.write_str(&format_duration(*d)),
            Value::Rate(r) => write!(f, "{}/{}", r.count, period_name(r.per)),
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::IpList(ips) => join(f, ips),
            Value::CidrList(nets) => join(f, nets),
            Value::List(items) => f.write_str(&items.join(",")),
            Value::DnsServers(DnsServers::System) => f.write_str("system"),
            Value::DnsServers(DnsServers::List(list)) => {
                let parts: Vec<String> = list
                    .iter()
                    .map(|a| {
                        if a.port() == 53 {
                            a.ip().to_string()
                        } else {
                            a.to_string()
                        }
                    })
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

fn join<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

fn split_list(t: &str) -> impl Iterator<Item = &str> {
    t.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_ip(t: &str) -> Result<IpAddr, ValueError> {
    t.parse()
        .or_else(|_| err(format!("{t:?} is not an IP address")))
}

fn parse_net(t: &str) -> Result<IpNet, ValueError> {
    if let Ok(net) = t.parse::<IpNet>() {
        // Store the network address so "192.0.2.7/24" reads back as "192.0.2.0/24".
        return Ok(net.trunc());
    }
    parse_ip(t).map(IpNet::from).or_else(|_| {
        err(format!(
            "{t:?} is not a network (expected e.g. 192.0.2.0/24)"
        ))
    })
}

fn parse_dns_server(t: &str) -> Result<std::net::SocketAddr, ValueError> {
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    t.parse()
        .or_else(|_| err(format!("{t:?} is not IP, IP:port or [IPv6]:port")))
}

/// Parses `50M`, `512K`, `2G`, `1048576`, `10MB`, `10MiB` (binary multiples, as Postfix and
/// most mail tools mean them).
pub fn parse_size(t: &str) -> Result<u64, ValueError> {
    let t = t.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .or_else(|_| err(format!("expected a size like 50M, got {t:?}")))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return err(format!("unknown size unit in {t:?} (use K, M, G)")),
    };
    n.checked_mul(mult)
        .map_or_else(|| err(format!("{t:?} is too large")), Ok)
}

/// The shortest exact form: `50M`, `1536K`, `100`.
pub fn format_size(n: u64) -> String {
    for (unit, mult) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    n.to_string()
}

/// Parses `30s`, `10m`, `1h`, `5d`, `1w`, `500ms`, `1h30m`, or a plain number of seconds.
pub fn parse_duration(t: &str) -> Result<Duration, ValueError> {
    let t = t.trim();
    if t.is_empty() {
        return err("expected a duration like 10m");
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: u64 = num
            .parse()
            .or_else(|_| err(format!("expected a duration like 10m, got {t:?}")))?;
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "sec" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "w" => Duration::from_secs(n.saturating_mul(604_800)),
            _ => {
                return err(format!(
                    "unknown unit {unit:?} in {t:?} (use ms, s, m, h, d, w)"
                ));
            }
        };
        total = total.saturating_add(part);
        rest = next;
    }
    Ok(total)
}

/// The shortest exact form with the largest unit: `10m`, `1h`, `90s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    for (unit, mult) in [("w", 604_800u64), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= mult && s.is_multiple_of(mult) {
            return format!("{}{unit}", s / mult);
        }
    }
    format!("{s}s")
}

fn parse_rate(t: &str) -> Result<Rate, ValueError> {
    let Some((count, period)) = t.split_once('/') else {
        return err(format!("expected a rate like 10/minute, got {t:?}"));
    };
    let count: u32 = count
        .trim()
        .parse()
        .or_else(|_| err(format!("expected a rate like 10/minute, got {t:?}")))?;
    let per = match period.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        p => {
            return err(format!(
                "unknown period {p:?} (use second, minute, hour, day)"
            ));
        }
    };
    if count == 0 {
        return err("a rate must allow at least 1 event");
    }
    Ok(Rate { count, per })
}

fn period_name(d: Duration) -> &'static str {
    match d.as_secs() {
        1 => "second",
        60 => "minute",
        3600 => "hour",
        _ => "day",
    }
}

#[cfg(test)]
mod tests {

    /// Found by the config_value fuzz target: 3,900 bytes of `::,` were accepted, and
    /// their canonical form (`::/128,` each) was then too long to be read back.
    #[test]
    fn a_value_whose_full_form_is_too_long_is_refused() {
        let kind = Kind::CidrList;
        let short = "::,".repeat(1300);
        assert!(short.len() <= MAX_TEXT);
        let e = Value::parse(&kind, &short).unwrap_err();
        assert!(e.0.contains("once written in full"), "{e:?}");
        let fits = "::,".repeat(500);
        let v = Value::parse(&kind, &fits).unwrap();
        assert_eq!(Value::parse(&kind, &v.to_string()).unwrap(), v);
    }
    use super::*;

    fn check(kind: Kind, input: &str, canonical: &str) {
        let v = Value::parse(&kind, input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(v.to_string(), canonical, "canonical form of {input:?}");
        // The canonical form parses back to the same value.
        assert_eq!(Value::parse(&kind, canonical).unwrap(), v);
    }

    fn bad(kind: Kind, input: &str, needle: &str) {
        let e = Value::parse(&kind, input).expect_err(input);
        assert!(e.0.contains(needle), "{input:?}: {e} lacks {needle:?}");
    }

    const SIZE: Kind = Kind::Size {
        min: 1,
        max: 1 << 40,
    };
    const DUR: Kind = Kind::Duration {
        min: Duration::from_secs(1),
        max: Duration::from_secs(86_400 * 365),
    };

    #[test]
    fn sizes() {
        check(SIZE, "50M", "50M");
        check(SIZE, "50m", "50M");
        check(SIZE, "52428800", "50M");
        check(SIZE, "1536K", "1536K");
        check(SIZE, "1000", "1000");
        check(SIZE, "10MiB", "10M");
        bad(SIZE, "50X", "unknown size unit");
        bad(SIZE, "-5", "expected a size");
        bad(SIZE, "0", "out of range");
        bad(SIZE, "99999999999999999999", "expected a size");
        bad(SIZE, "18446744073709551615G", "too large");
    }

    #[test]
    fn durations() {
        check(DUR, "10m", "10m");
        check(DUR, "600", "10m");
        check(DUR, "300", "5m");
        check(DUR, "90s", "90s");
        check(DUR, "1h30m", "90m");
        check(DUR, "5d", "5d");
        check(DUR, "14d", "2w");
        bad(DUR, "10x", "unknown unit");
        bad(DUR, "", "expected a duration");
        bad(DUR, "0s", "out of range");
        bad(DUR, "m", "expected a duration");
    }

    #[test]
    fn rates() {
        check(Kind::Rate, "10/minute", "10/minute");
        check(Kind::Rate, "5/s", "5/second");
        check(Kind::Rate, "100 / hour", "100/hour");
        bad(Kind::Rate, "10", "expected a rate");
        bad(Kind::Rate, "10/fortnight", "unknown period");
        bad(Kind::Rate, "0/minute", "at least 1");
    }

    #[test]
    fn addresses() {
        let v4 = Kind::IpList { v6: false };
        check(
            v4,
            "203.0.113.10, 203.0.113.11",
            "203.0.113.10,203.0.113.11",
        );
        bad(v4, "203.0.113.300", "not an IP address");
        bad(v4, "::", "not an IPv4 address");
        check(Kind::IpList { v6: true }, "::", "::");
        check(
            Kind::CidrList,
            "192.0.2.7/24,10.0.0.1",
            "192.0.2.0/24,10.0.0.1/32",
        );
        check(Kind::CidrList, "::1", "::1/128");
        bad(Kind::CidrList, "192.0.2.0/33", "not a network");
        check(Kind::DnsServers, "system", "system");
        check(
            Kind::DnsServers,
            "8.8.8.8,127.0.0.1:5353",
            "8.8.8.8,127.0.0.1:5353",
        );
        check(Kind::DnsServers, "[::1]:5353", "[::1]:5353");
        bad(Kind::DnsServers, "dns.example", "not IP");
    }

    #[test]
    fn scalars() {
        let port = Kind::Int { min: 1, max: 65535 };
        check(port, "25", "25");
        bad(port, "0", "out of range");
        bad(port, "70000", "out of range");
        bad(port, "twenty-five", "whole number");
        check(Kind::Bool, "TRUE", "true");
        check(Kind::Bool, "off", "false");
        bad(Kind::Bool, "maybe", "true or false");
        let score = Kind::Float {
            min: -100.0,
            max: 1000.0,
        };
        check(score, "4", "4.0");
        check(score, "6.5", "6.5");
        bad(score, "NaN", "expected a number");
        bad(score, "inf", "expected a number");
        let mode = Kind::Enum(&["none", "enabled", "mandatory"]);
        check(mode, "Mandatory", "mandatory");
        bad(mode, "required", "expected one of none, enabled, mandatory");
        check(Kind::EnumList(&["1.2", "1.3"]), "1.2, 1.3,1.3", "1.2,1.3");
        bad(Kind::Path, "relative/x", "absolute path");
        bad(Kind::Text { max: 8 }, "a\u{0}b", "control character");
    }

    #[test]
    fn toml_values() {
        let arr = toml::Value::Array(vec!["192.0.2.1".into(), "192.0.2.2".into()]);
        let v = Value::from_toml(&Kind::IpList { v6: false }, &arr).unwrap();
        assert_eq!(v.to_string(), "192.0.2.1,192.0.2.2");
        let e = Value::from_toml(&Kind::Bool, &toml::Value::String("yes".into())).unwrap_err();
        assert!(e.0.contains("true or false"));
        let v = Value::from_toml(&Kind::Int { min: 1, max: 65535 }, &toml::Value::Integer(25));
        assert_eq!(v.unwrap(), Value::Int(25));
    }
}
