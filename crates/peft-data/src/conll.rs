//! Reading CoNLL-style token classification files (CoNLL-2003 NER and friends).
//!
//! One token per line: the first whitespace-separated column is the word, the last is its tag.
//! Blank lines separate sentences, `-DOCSTART-` lines are skipped, trailing whitespace and CRLF
//! line ends are tolerated. Tags must be `O`, `B-X` or `I-X`; they come back as IOB2.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::scheme::{apply_scheme, Tag, TagScheme};

/// One sentence: words, their IOB2 tags, and where it starts in its file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sentence {
    /// The words (first column).
    pub words: Vec<String>,
    /// One tag per word (last column), IOB2 after reading.
    pub tags: Vec<String>,
    /// 1-based line of the first word in the file; word `i` is on line `line + i`.
    pub line: usize,
}

impl Sentence {
    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the sentence has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

/// Reads a CoNLL file into sentences with IOB2 tags.
///
/// Errors name the file and line: unreadable file, invalid UTF-8, a line with fewer than two
/// columns, an invalid tag, data declared [`TagScheme::Iob2`] that is not, or no sentences at all.
pub fn read_conll(path: impl AsRef<Path>, scheme: TagScheme) -> Result<Vec<Sentence>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let name = path.display().to_string();
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            return Err(DataError::Utf8 { path: name, line });
        }
    };
    parse_conll_str(&text, &name, scheme)
}

/// Parses CoNLL text; `name` stands for the file in error messages.
///
/// ```
/// use peft_data::{parse_conll_str, TagScheme};
/// let text = "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n";
/// let sentences = parse_conll_str(text, "train.txt", TagScheme::Auto)?;
/// assert_eq!(sentences.len(), 2);
/// assert_eq!(sentences[0].words, ["EU", "rejects"]);
/// assert_eq!(sentences[1].line, 6);
/// # Ok::<(), peft_data::DataError>(())
/// ```
pub fn parse_conll_str(text: &str, name: &str, scheme: TagScheme) -> Result<Vec<Sentence>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sentences = Vec::new();
    let mut current = Sentence::default();
    let mut flush = |current: &mut Sentence| {
        if !current.is_empty() {
            sentences.push(std::mem::take(current));
        }
    };
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let mut columns = raw.split_whitespace();
        let Some(word) = columns.next() else {
            flush(&mut current);
            continue;
        };
        if word == "-DOCSTART-" {
            flush(&mut current);
            continue;
        }
        let Some(tag) = columns.last() else {
            return Err(DataError::Columns {
                path: name.to_string(),
                line,
                found: 1,
            });
        };
        if Tag::parse(tag).is_none() {
            return Err(DataError::InvalidTag {
                path: name.to_string(),
                line,
                tag: tag.to_string(),
            });
        }
        if current.is_empty() {
            current.line = line;
        }
        current.words.push(word.to_string());
        current.tags.push(tag.to_string());
    }
    flush(&mut current);
    if sentences.is_empty() {
        return Err(DataError::EmptyDataset {
            path: name.to_string(),
        });
    }
    apply_scheme(&mut sentences, scheme, name)?;
    Ok(sentences)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_trailing_space_and_tabs() {
        let text = "A\tNN\tB-PER \r\nB NN I-PER\t\r\n\r\n\r\nC x y O\r\n";
        let s = parse_conll_str(text, "t", TagScheme::Iob2).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].tags, ["B-PER", "I-PER"]);
        assert_eq!(s[1].words, ["C"]);
        assert_eq!(s[1].line, 5);
    }

    #[test]
    fn docstart_without_blank_ends_sentence() {
        let text = "A O\n-DOCSTART- -X- -X- O\nB O\n";
        let s = parse_conll_str(text, "t", TagScheme::Auto).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].line, 3);
    }

    #[test]
    fn bom_is_ignored() {
        let s = parse_conll_str("\u{feff}A O\n", "t", TagScheme::Auto).unwrap();
        assert_eq!(s[0].words, ["A"]);
    }

    #[test]
    fn auto_converts_iob1() {
        let text = "John I-PER\nSmith I-PER\nin O\nParis I-LOC\n";
        let s = parse_conll_str(text, "t", TagScheme::Auto).unwrap();
        assert_eq!(s[0].tags, ["B-PER", "I-PER", "O", "B-LOC"]);
    }

    #[test]
    fn iob2_rejects_iob1_with_line() {
        let text = "x O\n\nJohn B-PER\nin O\nParis I-LOC\n";
        let err = parse_conll_str(text, "d.txt", TagScheme::Iob2).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("d.txt:5: tag `I-LOC`"), "{msg}");
        assert!(msg.contains("previous tag: `O`"), "{msg}");
    }
}
