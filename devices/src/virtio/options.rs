//! `key=value,key=value` device options, as given to `kiln run --disk`,
//! `--net`, ... Each device's config type parses its own keys with these
//! helpers, so every device rejects typos and bad values the same way.

use std::collections::BTreeMap;

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
}

/// Parsed options; each key may be taken once.
#[derive(Debug)]
pub struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    /// Parses `text`, accepting only `known` keys. A bare word (no `=`) is
    /// a flag with the value `on`.
    pub fn parse(text: &str, known: &[&str]) -> Result<Options, OptionsError> {
        let mut values = BTreeMap::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(OptionsError::Empty(text.to_string()));
            }
            let (key, value) = part.split_once('=').unwrap_or((part, "on"));
            if !known.contains(&key) {
                return Err(OptionsError::Unknown {
                    key: key.into(),
                    known: known.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(OptionsError::Duplicate { key: key.into() });
            }
        }
        Ok(Options { values })
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    pub fn required(&mut self, key: &str) -> Result<String, OptionsError> {
        self.take(key)
            .ok_or_else(|| OptionsError::Missing(key.into()))
    }

    /// `on|off|true|false|yes|no|1|0`; `default` when absent.
    pub fn flag(&mut self, key: &str, default: bool) -> Result<bool, OptionsError> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(invalid(key, &v, "expected on or off")),
            },
        }
    }

    /// A number parsed with `FromStr`; `None` when absent.
    pub fn number<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, OptionsError>
    where
        T::Err: std::fmt::Display,
    {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e: T::Err| invalid(key, &v, &e.to_string())),
        }
    }
}

pub fn invalid(key: &str, value: &str, why: &str) -> OptionsError {
    OptionsError::Invalid {
        key: key.into(),
        value: value.into(),
        why: why.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_flags_and_rejects_mistakes() {
        let mut o = Options::parse(
            "path=/a b,readonly,serial=x=y",
            &["path", "readonly", "serial"],
        )
        .unwrap();
        assert_eq!(o.required("path").unwrap(), "/a b");
        assert!(o.flag("readonly", false).unwrap());
        assert_eq!(o.take("serial").as_deref(), Some("x=y"));
        assert_eq!(
            o.required("path"),
            Err(OptionsError::Missing("path".into()))
        );

        assert!(matches!(
            Options::parse("pth=x", &["path"]),
            Err(OptionsError::Unknown { .. })
        ));
        assert!(matches!(
            Options::parse("path=a,path=b", &["path"]),
            Err(OptionsError::Duplicate { .. })
        ));
        assert!(matches!(
            Options::parse("path=a,,", &["path"]),
            Err(OptionsError::Empty(_))
        ));
        let mut o = Options::parse("ro=maybe,n=12x", &["ro", "n"]).unwrap();
        assert!(matches!(
            o.flag("ro", false),
            Err(OptionsError::Invalid { .. })
        ));
        assert!(matches!(
            o.number::<u32>("n"),
            Err(OptionsError::Invalid { .. })
        ));
    }
}
