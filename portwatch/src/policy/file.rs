//! The TOML layer: the shape of the policy file, with the position of every
//! value that a later error may need to point at.
//!
//! Hand-written visitors rather than derives: `#[serde(untagged)]` (string
//! or table) buffers the value, which loses the spans inside it and turns
//! every error in a rule into "data did not match any variant" pointing at
//! `allow = [`. Here each error comes from the value it is about, so toml
//! gives it that value's span. Meaning (specs, CIDRs, overlaps) is checked
//! by the caller; these types only hold strings.

use std::{fmt, marker::PhantomData};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::{Forwarded, Mode};

#[derive(Debug, Default)]
pub(super) struct RawFile {
    pub mode: Option<Mode>,
    pub forwarded: Option<Forwarded>,
    /// `limit_ipv6_prefix`: how IPv6 sources of limited rules are grouped.
    pub limit_ipv6_prefix: Option<Spanned<i64>>,
    pub interfaces: Vec<Spanned<String>>,
    pub allow: Vec<Spanned<RawEntry>>,
}

/// One element of `allow`.
#[derive(Debug)]
pub(super) enum RawEntry {
    /// `"tcp/22"`: the outer span is the spec's.
    Spec(String),
    /// `{ port = "tcp/22", from = [...] }`; `from: None` is "from anywhere".
    Table {
        port: Spanned<String>,
        from: Option<Spanned<Vec<Spanned<String>>>>,
        /// `limit = "10/minute"`.
        limit: Option<Spanned<String>>,
        /// `owner = { unit = "redis-server.service" }`.
        owner: Option<Box<Spanned<RawOwner>>>,
    },
}

/// `owner = { unit = ..., cgroup = ..., user = ..., comm = ..., exe = ..., sha256 = ... }`.
#[derive(Debug, Default)]
pub(super) struct RawOwner {
    pub unit: Option<Spanned<String>>,
    pub cgroup: Option<Spanned<String>>,
    pub user: Option<Spanned<RawUser>>,
    pub comm: Option<Spanned<String>>,
    pub exe: Option<Spanned<String>>,
    pub sha256: Option<Spanned<String>>,
}

/// A user as a name or a uid.
#[derive(Debug)]
pub(super) enum RawUser {
    Name(String),
    Id(i64),
}

/// Reads a whole document; syntax errors are toml's, everything else is a
/// `toml::de::Error` whose span is the offending key or value.
pub(super) fn read(text: &str) -> Result<RawFile, ReadError> {
    let de = toml::Deserializer::parse(text).map_err(ReadError::Syntax)?;
    RawFile::deserialize(de).map_err(ReadError::Shape)
}

pub(super) enum ReadError {
    Syntax(toml::de::Error),
    Shape(toml::de::Error),
}

/// A key of a table with a fixed set of keys. Checked while the key is
/// deserialized, so that toml points the error at the key itself.
struct Key {
    allowed: &'static [&'static str],
    place: &'static str,
}

impl<'de> de::DeserializeSeed<'de> for Key {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for Key {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a key of {}", self.place)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<&'static str, E> {
        if let Some(key) = self.allowed.iter().find(|k| **k == v) {
            return Ok(key);
        }
        let expected = match self.allowed {
            [] => String::new(),
            [one] => (*one).to_owned(),
            [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
        };
        Err(E::custom(format_args!(
            "unknown key {v:?} in {} (expected {expected})",
            self.place
        )))
    }
}

/// An array of `T`, with an `expecting` text that shows the right form.
struct SeqOf<T>(&'static str, PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqOf<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

fn seq_of<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(SeqOf(expecting, PhantomData))
}

/// A string, with an `expecting` text that shows the right form.
struct StrOf(&'static str);

impl Visitor<'_> for StrOf {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
}

struct Interfaces(Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for Interfaces {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        seq_of(
            d,
            r#"an array of interface names, e.g. interfaces = ["eth0"]"#,
        )
        .map(Interfaces)
    }
}

struct Rules(Vec<Spanned<RawEntry>>);

impl<'de> Deserialize<'de> for Rules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        seq_of(d, r#"an array of rules, e.g. allow = ["tcp/22", "udp/53"]"#).map(Rules)
    }
}

struct Sources(Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for Sources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        seq_of(
            d,
            r#"an array of addresses or CIDRs, e.g. from = ["10.0.0.0/8"]"#,
        )
        .map(Sources)
    }
}

struct PortSpec(String);

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOf(r#"a port spec string like "tcp/22""#))
            .map(PortSpec)
    }
}

struct LimitSpec(String);

impl<'de> Deserialize<'de> for LimitSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOf(r#"a limit string like "10/minute""#))
            .map(LimitSpec)
    }
}

struct OwnerText(String);

impl<'de> Deserialize<'de> for OwnerText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOf("a string")).map(OwnerText)
    }
}

impl<'de> Deserialize<'de> for RawUser {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UserVisitor)
    }
}

struct UserVisitor;

impl Visitor<'_> for UserVisitor {
    type Value = RawUser;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a user name or uid, e.g. user = "www-data" or user = 33"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawUser, E> {
        Ok(RawUser::Name(v.to_owned()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawUser, E> {
        Ok(RawUser::Id(v))
    }
}

impl<'de> Deserialize<'de> for RawOwner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OwnerVisitor)
    }
}

struct OwnerVisitor;

impl<'de> Visitor<'de> for OwnerVisitor {
    type Value = RawOwner;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an owner table, e.g. owner = { unit = "redis-server.service" }"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawOwner, A::Error> {
        let key = || Key {
            allowed: &["unit", "cgroup", "user", "comm", "exe", "sha256"],
            place: "an owner",
        };
        let mut owner = RawOwner::default();
        let text = |v: Spanned<OwnerText>| {
            let span = v.span();
            Spanned::new(span, v.into_inner().0)
        };
        while let Some(k) = map.next_key_seed(key())? {
            let taken = match k {
                "unit" => owner.unit.is_some(),
                "cgroup" => owner.cgroup.is_some(),
                "user" => owner.user.is_some(),
                "comm" => owner.comm.is_some(),
                "exe" => owner.exe.is_some(),
                _ => owner.sha256.is_some(),
            };
            if taken {
                return Err(de::Error::duplicate_field(k));
            }
            match k {
                "unit" => owner.unit = Some(text(map.next_value()?)),
                "cgroup" => owner.cgroup = Some(text(map.next_value()?)),
                "user" => owner.user = Some(map.next_value()?),
                "comm" => owner.comm = Some(text(map.next_value()?)),
                "exe" => owner.exe = Some(text(map.next_value()?)),
                _ => owner.sha256 = Some(text(map.next_value()?)),
            }
        }
        Ok(owner)
    }
}

struct ModeValue(Mode);

impl<'de> Deserialize<'de> for ModeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = d.deserialize_str(StrOf(r#"mode = "enforce" or mode = "audit""#))?;
        s.parse().map(ModeValue).map_err(de::Error::custom)
    }
}

struct ForwardedValue(Forwarded);

impl<'de> Deserialize<'de> for ForwardedValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = d.deserialize_str(StrOf(r#"forwarded = "pass" or forwarded = "judge""#))?;
        s.parse().map(ForwardedValue).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for RawFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FileVisitor)
    }
}

struct FileVisitor;

impl<'de> Visitor<'de> for FileVisitor {
    type Value = RawFile;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a policy table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
        let key = || Key {
            allowed: &[
                "mode",
                "forwarded",
                "limit_ipv6_prefix",
                "interfaces",
                "allow",
            ],
            place: "the policy",
        };
        // toml rejects repeated keys before this runs; each one is still
        // read once only, so a repeat cannot slip through another format.
        let mut file = RawFile::default();
        let (mut mode, mut forwarded, mut interfaces, mut allow) = (false, false, false, false);
        let mut prefix = false;
        while let Some(k) = map.next_key_seed(key())? {
            let seen = match k {
                "mode" => &mut mode,
                "forwarded" => &mut forwarded,
                "limit_ipv6_prefix" => &mut prefix,
                "interfaces" => &mut interfaces,
                _ => &mut allow,
            };
            if std::mem::replace(seen, true) {
                return Err(de::Error::duplicate_field(k));
            }
            match k {
                "mode" => file.mode = Some(map.next_value::<ModeValue>()?.0),
                "forwarded" => file.forwarded = Some(map.next_value::<ForwardedValue>()?.0),
                "limit_ipv6_prefix" => file.limit_ipv6_prefix = Some(map.next_value()?),
                "interfaces" => file.interfaces = map.next_value::<Interfaces>()?.0,
                _ => file.allow = map.next_value::<Rules>()?.0,
            }
        }
        Ok(file)
    }
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = RawEntry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            r#"a port spec like "tcp/22" or a table like { port = "tcp/22", from = ["10.0.0.0/8"] }"#,
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEntry, E> {
        Ok(RawEntry::Spec(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEntry, A::Error> {
        let key = || Key {
            allowed: &["port", "from", "limit", "owner"],
            place: "an allow rule",
        };
        let mut port: Option<Spanned<PortSpec>> = None;
        let mut from: Option<Spanned<Sources>> = None;
        let mut limit: Option<Spanned<LimitSpec>> = None;
        let mut owner: Option<Box<Spanned<RawOwner>>> = None;
        while let Some(k) = map.next_key_seed(key())? {
            match k {
                "owner" => {
                    if owner.is_some() {
                        return Err(de::Error::duplicate_field("owner"));
                    }
                    owner = Some(Box::new(map.next_value()?));
                }
                "port" => {
                    if port.is_some() {
                        return Err(de::Error::duplicate_field("port"));
                    }
                    port = Some(map.next_value()?);
                }
                "from" => {
                    if from.is_some() {
                        return Err(de::Error::duplicate_field("from"));
                    }
                    from = Some(map.next_value()?);
                }
                _ => {
                    if limit.is_some() {
                        return Err(de::Error::duplicate_field("limit"));
                    }
                    limit = Some(map.next_value()?);
                }
            }
        }
        // Raised after the keys, so toml points it at the whole table.
        let port = port.ok_or_else(|| {
            de::Error::custom(r#"this allow rule has no `port`: write e.g. { port = "tcp/22", from = ["10.0.0.0/8"] }"#)
        })?;
        let (span, PortSpec(spec)) = (port.span(), port.into_inner());
        Ok(RawEntry::Table {
            port: Spanned::new(span, spec),
            from: from.map(|f| {
                let span = f.span();
                Spanned::new(span, f.into_inner().0)
            }),
            limit: limit.map(|l| {
                let span = l.span();
                Spanned::new(span, l.into_inner().0)
            }),
            owner,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_err(text: &str) -> String {
        match read(text) {
            Ok(f) => panic!("{text:?} was read: {f:?}"),
            Err(ReadError::Syntax(e)) => panic!("{text:?}: syntax error {e}"),
            Err(ReadError::Shape(e)) => {
                let at = e.span().map(|s| text.get(s).unwrap_or("?").to_owned());
                format!("{} @ {}", e.message(), at.unwrap_or_default())
            }
        }
    }

    fn read_ok(text: &str) -> RawFile {
        match read(text) {
            Ok(f) => f,
            Err(ReadError::Syntax(e) | ReadError::Shape(e)) => panic!("{text:?}: {e}"),
        }
    }

    /// The reason this module exists: spans of strings and tables inside
    /// the `allow` array, inline and as `[[allow]]`, and of the values
    /// inside the tables.
    #[test]
    fn spans_inside_arrays() {
        let text = "allow = [\n  \"tcp/22\",\n  { port = \"tcp/1\", from = [\"a\", \"b\"] },\n]\n";
        let file = read_ok(text);
        let [first, second] = file.allow.as_slice() else {
            panic!("two rules expected: {:?}", file.allow);
        };
        assert_eq!(&text[first.span()], "\"tcp/22\"");
        assert_eq!(
            &text[second.span()],
            "{ port = \"tcp/1\", from = [\"a\", \"b\"] }"
        );
        let RawEntry::Table {
            port,
            from: Some(from),
            ..
        } = second.get_ref()
        else {
            panic!("a table with `from` expected: {second:?}");
        };
        assert_eq!(&text[port.span()], "\"tcp/1\"");
        assert_eq!(port.get_ref(), "tcp/1");
        assert_eq!(&text[from.span()], "[\"a\", \"b\"]");
        let b = from.get_ref().get(1).expect("two sources");
        assert_eq!(&text[b.span()], "\"b\"");

        let text = "[[allow]]\nport = \"tcp/1\"\n\n[[allow]]\nfrom = [\"x\"]\nport = \"udp/2\"\n";
        let file = read_ok(text);
        let ports: Vec<&str> = file
            .allow
            .iter()
            .map(|e| match e.get_ref() {
                RawEntry::Table { port, .. } => &text[port.span()],
                RawEntry::Spec(_) => panic!("tables expected"),
            })
            .collect();
        assert_eq!(ports, ["\"tcp/1\"", "\"udp/2\""]);
    }

    #[test]
    fn empty_and_full_files() {
        let file = read_ok("");
        assert!(file.mode.is_none() && file.interfaces.is_empty() && file.allow.is_empty());
        let file = read_ok("mode = \"audit\"\ninterfaces = [\"eth0\", \"eth1\"]\nallow = []\n");
        assert_eq!(file.mode, Some(Mode::Audit));
        assert_eq!(file.interfaces.len(), 2);
    }

    /// Each shape error carries the span of what it is about.
    #[test]
    fn shape_errors_point_at_the_culprit() {
        assert_eq!(
            shape_err("bogus = 1"),
            r#"unknown key "bogus" in the policy (expected mode, forwarded, limit_ipv6_prefix, interfaces or allow) @ bogus"#
        );
        assert_eq!(
            shape_err("allow = [\n { port = \"tcp/1\", frm = [] },\n]"),
            r#"unknown key "frm" in an allow rule (expected port, from, limit or owner) @ frm"#
        );
        assert_eq!(
            shape_err("allow = \"tcp/22\""),
            r#"invalid type: string "tcp/22", expected an array of rules, e.g. allow = ["tcp/22", "udp/53"] @ "tcp/22""#
        );
        assert_eq!(
            shape_err("allow = [\"tcp/1\", 22]"),
            r#"invalid type: integer `22`, expected a port spec like "tcp/22" or a table like { port = "tcp/22", from = ["10.0.0.0/8"] } @ 22"#
        );
        assert_eq!(
            shape_err("allow = [{ port = 22 }]"),
            r#"invalid type: integer `22`, expected a port spec string like "tcp/22" @ 22"#
        );
        assert_eq!(
            shape_err("allow = [{ from = [\"10.0.0.0/8\"] }]"),
            r#"this allow rule has no `port`: write e.g. { port = "tcp/22", from = ["10.0.0.0/8"] } @ { from = ["10.0.0.0/8"] }"#
        );
        assert_eq!(
            shape_err("allow = [{ port = \"tcp/1\", from = \"10.0.0.0/8\" }]"),
            r#"invalid type: string "10.0.0.0/8", expected an array of addresses or CIDRs, e.g. from = ["10.0.0.0/8"] @ "10.0.0.0/8""#
        );
        assert_eq!(
            shape_err("mode = \"block\""),
            r#"unknown mode "block" (expected "enforce" or "audit") @ "block""#
        );
        assert_eq!(
            shape_err("mode = 1"),
            r#"invalid type: integer `1`, expected mode = "enforce" or mode = "audit" @ 1"#
        );
        assert_eq!(
            shape_err("interfaces = \"eth0\""),
            r#"invalid type: string "eth0", expected an array of interface names, e.g. interfaces = ["eth0"] @ "eth0""#
        );
        assert_eq!(
            shape_err("interfaces = [1]"),
            r#"invalid type: integer `1`, expected a string @ 1"#
        );
    }
}
