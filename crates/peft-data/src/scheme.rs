//! IOB tagging schemes: parsing tags, detecting IOB1 and converting it to IOB2.
//!
//! In IOB2 every entity starts with `B-X`. In IOB1 an entity starts with `I-X` and `B-X` only
//! separates two adjacent entities of the same type. Converting IOB1 to IOB2 turns every `I-X`
//! that starts an entity (after `O`, at the start of a sentence, or after a different type) into
//! `B-X`; on data that already is IOB2 that conversion changes nothing.

use serde::{Deserialize, Serialize};

use crate::conll::Sentence;
use crate::error::{DataError, Result};

/// The tagging scheme a CoNLL file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagScheme {
    /// IOB1: entities start with `I-X`; convert to IOB2 when reading.
    Iob1,
    /// IOB2: entities start with `B-X`; an `I-X` that starts an entity is an error.
    Iob2,
    /// Detect: if any `I-X` starts an entity the file is IOB1 (and is converted), else IOB2.
    #[default]
    Auto,
}

/// A parsed IOB tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag<'a> {
    /// Outside any entity.
    O,
    /// Beginning of an entity of the given type.
    B(&'a str),
    /// Inside an entity of the given type.
    I(&'a str),
}

impl<'a> Tag<'a> {
    /// Parses `O`, `B-<type>` or `I-<type>` (type non-empty); anything else is `None`.
    pub fn parse(tag: &'a str) -> Option<Self> {
        if tag == "O" {
            return Some(Tag::O);
        }
        let (prefix, kind) = tag.split_once('-')?;
        if kind.is_empty() {
            return None;
        }
        match prefix {
            "B" => Some(Tag::B(kind)),
            "I" => Some(Tag::I(kind)),
            _ => None,
        }
    }

    /// The entity type, `None` for `O`.
    pub fn kind(&self) -> Option<&'a str> {
        match *self {
            Tag::O => None,
            Tag::B(k) | Tag::I(k) => Some(k),
        }
    }
}

/// Index of the first `I-X` in `tags` that starts an entity (IOB1 style), if any.
fn first_iob1_start(tags: &[String]) -> Option<usize> {
    let mut prev: Option<&str> = None;
    for (i, tag) in tags.iter().enumerate() {
        let parsed = Tag::parse(tag);
        if let Some(Tag::I(kind)) = parsed {
            if prev != Some(kind) {
                return Some(i);
            }
        }
        prev = parsed.and_then(|t| t.kind());
    }
    None
}

/// Detects the scheme of already-read sentences: [`TagScheme::Iob1`] if any `I-X` starts an
/// entity, else [`TagScheme::Iob2`].
pub fn detect_scheme(sentences: &[Sentence]) -> TagScheme {
    if sentences
        .iter()
        .any(|s| first_iob1_start(&s.tags).is_some())
    {
        TagScheme::Iob1
    } else {
        TagScheme::Iob2
    }
}

/// Converts one sentence's tags from IOB1 to IOB2 in place (a no-op on IOB2 tags).
pub fn iob1_to_iob2(tags: &mut [String]) {
    let mut prev: Option<String> = None;
    for tag in tags.iter_mut() {
        let (rewrite, kind) = match Tag::parse(tag) {
            Some(Tag::I(kind)) => (prev.as_deref() != Some(kind), Some(kind.to_string())),
            Some(t) => (false, t.kind().map(str::to_string)),
            None => (false, None),
        };
        if rewrite {
            tag.replace_range(..1, "B");
        }
        prev = kind;
    }
}

/// Applies `scheme` to sentences read from `path`: converts IOB1 (declared or detected) to IOB2,
/// and checks that data declared IOB2 is valid IOB2.
pub(crate) fn apply_scheme(
    sentences: &mut [Sentence],
    scheme: TagScheme,
    path: &str,
) -> Result<()> {
    let convert = match scheme {
        TagScheme::Iob1 => true,
        TagScheme::Auto => detect_scheme(sentences) == TagScheme::Iob1,
        TagScheme::Iob2 => {
            for s in sentences.iter() {
                if let Some(i) = first_iob1_start(&s.tags) {
                    let previous = match i {
                        0 => "start of sentence".to_string(),
                        _ => format!("`{}`", s.tags[i - 1]),
                    };
                    return Err(DataError::NotIob2 {
                        path: path.to_string(),
                        line: s.line + i,
                        tag: s.tags[i].clone(),
                        previous,
                    });
                }
            }
            false
        }
    };
    if convert {
        for s in sentences.iter_mut() {
            iob1_to_iob2(&mut s.tags);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parse_tags() {
        assert_eq!(Tag::parse("O"), Some(Tag::O));
        assert_eq!(Tag::parse("B-PER"), Some(Tag::B("PER")));
        assert_eq!(Tag::parse("I-ORG-X"), Some(Tag::I("ORG-X")));
        for bad in ["B-", "E-PER", "PER", "o", "", "-PER"] {
            assert_eq!(Tag::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn converts_iob1() {
        let mut t = tags("I-PER I-PER O I-LOC B-LOC I-ORG I-MISC I-MISC");
        iob1_to_iob2(&mut t);
        assert_eq!(t, tags("B-PER I-PER O B-LOC B-LOC B-ORG B-MISC I-MISC"));
    }

    #[test]
    fn conversion_is_identity_on_iob2() {
        let orig = tags("B-PER I-PER O B-LOC B-LOC I-LOC B-ORG B-MISC I-MISC");
        let mut t = orig.clone();
        iob1_to_iob2(&mut t);
        assert_eq!(t, orig);
    }

    #[test]
    fn serde_names() {
        let s: TagScheme = serde_json::from_str("\"iob1\"").unwrap();
        assert_eq!(s, TagScheme::Iob1);
        assert_eq!(serde_json::to_string(&TagScheme::Auto).unwrap(), "\"auto\"");
    }
}
