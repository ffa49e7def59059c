//! `key=value,key=value` device options, as given to `kiln run --disk`,
//! `--net`, ...: a small serde deserializer, so a device's config type has
//! one parser (its `Deserialize` impl) for flags, JSON and TOML alike, and
//! every device rejects typos and bad values the same way.
//!
//! - `k=v` pairs separated by commas; a bare word `k` means `k=on`;
//! - booleans: `on|off|true|false|yes|no|1|0`; numbers as Rust parses them;
//!   everything else is a string (a value may contain `=`);
//! - unknown keys (with the known ones listed), duplicates (also through
//!   serde aliases) and empty items are errors.

use std::fmt::{self, Display};
use std::path::PathBuf;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("empty option in {0:?}")]
    Empty(String),
    #[error("option {key:?} is given twice")]
    Duplicate { key: String },
    #[error("unknown option {key:?} (known: {known})")]
    Unknown { key: String, known: String },
    #[error("invalid value {value:?} for {key}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
    #[error("missing required option {0:?}")]
    Missing(String),
    #[error("{0}")]
    Other(String),
}

impl de::Error for OptionsError {
    fn custom<T: Display>(msg: T) -> Self {
        OptionsError::Other(msg.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        OptionsError::Unknown {
            key: field.into(),
            known: if expected.is_empty() {
                "none".into()
            } else {
                expected.join(", ")
            },
        }
    }

    fn duplicate_field(field: &'static str) -> Self {
        OptionsError::Duplicate { key: field.into() }
    }

    fn missing_field(field: &'static str) -> Self {
        OptionsError::Missing(field.into())
    }
}

/// Parses `text` into `T` through its `Deserialize` impl. An empty (or
/// all-blank) text is a config with no keys set.
pub fn from_options<T: DeserializeOwned>(text: &str) -> Result<T, OptionsError> {
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    if !text.trim().is_empty() {
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(OptionsError::Empty(text.to_string()));
            }
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.to_string())),
                None => (part, None),
            };
            if pairs.iter().any(|(k, _)| k == key) {
                return Err(OptionsError::Duplicate { key: key.into() });
            }
            pairs.push((key.to_string(), value));
        }
    }
    T::deserialize(OptionsDeserializer { pairs })
}

/// `deserialize_with` helper for paths that must be given.
pub fn non_empty_path<'de, D: de::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    use serde::Deserialize;
    let path = PathBuf::deserialize(d)?;
    if path.as_os_str().is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    Ok(path)
}

/// An error about the value of `key`, naming both.
pub fn invalid(key: &str, value: &str, why: &str) -> OptionsError {
    OptionsError::Invalid {
        key: key.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// The whole option string: a map of keys to values.
struct OptionsDeserializer {
    pairs: Vec<(String, Option<String>)>,
}

impl<'de> de::Deserializer<'de> for OptionsDeserializer {
    type Error = OptionsError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        visitor.visit_map(Pairs {
            pairs: self.pairs.into_iter(),
            current: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct Pairs {
    pairs: std::vec::IntoIter<(String, Option<String>)>,
    /// The key whose value comes next, for error messages.
    current: Option<(String, Option<String>)>,
}

impl<'de> MapAccess<'de> for Pairs {
    type Error = OptionsError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, OptionsError> {
        match self.pairs.next() {
            None => Ok(None),
            Some((key, value)) => {
                let k = seed.deserialize(key.as_str().into_deserializer())?;
                self.current = Some((key, value));
                Ok(Some(k))
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, OptionsError> {
        let (key, value) = self
            .current
            .take()
            .ok_or_else(|| OptionsError::Other("value without a key".into()))?;
        let shown = value.clone().unwrap_or_else(|| "on".into());
        seed.deserialize(Value {
            key: &key,
            value: value.as_deref(),
        })
        .map_err(|e| match e {
            // Errors from the value's own type: say which key and value.
            OptionsError::Other(why) => invalid(&key, &shown, &why),
            other => other,
        })
    }
}

/// One value; `None` is a bare word.
struct Value<'a> {
    key: &'a str,
    value: Option<&'a str>,
}

impl Value<'_> {
    fn text(&self) -> Result<&str, OptionsError> {
        self.value
            .ok_or_else(|| invalid(self.key, "", "needs a value (key=value)"))
    }

    fn number<T: std::str::FromStr>(&self) -> Result<T, OptionsError>
    where
        T::Err: Display,
    {
        let text = self.text()?;
        text.trim()
            .parse()
            .map_err(|e: T::Err| invalid(self.key, text, &e.to_string()))
    }
}

macro_rules! numbers {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
            visitor.$visit(self.number::<$ty>()?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Value<'_> {
    type Error = OptionsError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        match self.value {
            None => visitor.visit_bool(true),
            Some(text) => visitor.visit_str(text),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        match self.value {
            None | Some("on" | "true" | "yes" | "1") => visitor.visit_bool(true),
            Some("off" | "false" | "no" | "0") => visitor.visit_bool(false),
            Some(other) => Err(invalid(self.key, other, "expected on or off")),
        }
    }

    numbers! {
        deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32, deserialize_i64 => visit_i64: i64,
        deserialize_u8 => visit_u8: u8, deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32, deserialize_u64 => visit_u64: u64,
        deserialize_f32 => visit_f32: f32, deserialize_f64 => visit_f64: f64,
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        visitor.visit_str(self.text()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptionsError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, OptionsError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OptionsError> {
        visitor.visit_enum(self.text()?.into_deserializer())
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}", self.key, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        path: String,
        #[serde(default, alias = "ro")]
        read_only: bool,
        #[serde(default)]
        serial: Option<String>,
        #[serde(default)]
        count: u32,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Slow,
    }

    #[test]
    fn parses_values_flags_numbers_and_enums() {
        let s: Sample = from_options("path=/a b,ro,serial=x=y,count=12,mode=slow").unwrap();
        assert_eq!(
            s,
            Sample {
                path: "/a b".into(),
                read_only: true,
                serial: Some("x=y".into()),
                count: 12,
                mode: Some(Mode::Slow),
            }
        );
        let s: Sample = from_options("read_only=off,path=p").unwrap();
        assert!(!s.read_only);
        assert_eq!(s.mode, None);
    }

    #[test]
    fn rejects_mistakes_clearly() {
        let e = from_options::<Sample>("pth=x").unwrap_err();
        assert!(
            matches!(&e, OptionsError::Unknown { key, known } if key == "pth" && known.contains("path")),
            "{e}"
        );
        assert!(e.to_string().contains("known:"), "{e}");
        assert_eq!(
            from_options::<Sample>("path=a,path=b"),
            Err(OptionsError::Duplicate { key: "path".into() })
        );
        // The same field through its alias is a duplicate too.
        assert!(matches!(
            from_options::<Sample>("path=a,ro,read_only=on"),
            Err(OptionsError::Duplicate { .. })
        ));
        assert!(matches!(
            from_options::<Sample>("path=a,,"),
            Err(OptionsError::Empty(_))
        ));
        assert_eq!(
            from_options::<Sample>("ro"),
            Err(OptionsError::Missing("path".into()))
        );
        for bad in [
            "path=a,ro=maybe",
            "path=a,count=12x",
            "path=a,count=-1",
            "path",
        ] {
            assert!(
                matches!(
                    from_options::<Sample>(bad),
                    Err(OptionsError::Invalid { .. })
                ),
                "{bad}: {:?}",
                from_options::<Sample>(bad)
            );
        }
        let e = from_options::<Sample>("path=a,mode=medium").unwrap_err();
        assert!(
            matches!(&e, OptionsError::Invalid { key, .. } if key == "mode")
                && e.to_string().contains("fast"),
            "{e}"
        );
    }

    #[test]
    fn empty_text_sets_nothing() {
        #[derive(Debug, Deserialize, PartialEq, Default)]
        #[serde(default, deny_unknown_fields)]
        struct AllDefault {
            a: bool,
        }
        assert_eq!(from_options::<AllDefault>(""), Ok(AllDefault::default()));
        assert_eq!(from_options::<AllDefault>("  "), Ok(AllDefault::default()));
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Nothing {}
        let e = from_options::<Nothing>("x=1").unwrap_err();
        assert!(e.to_string().contains("known: none"), "{e}");
    }
}
