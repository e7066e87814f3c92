//! The label vocabulary of a token classification task.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::conll::Sentence;
use crate::error::{DataError, Result};
use crate::scheme::Tag;

/// An ordered, deterministic list of labels with their ids.
///
/// Built from the training split it holds `O` first, then, for every entity type in sorted
/// order, `B-X` followed by `I-X`. Both are included for every type seen, even if the data only
/// has one of them, so that continuation sub-tokens always have an `I-X` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSet {
    names: Vec<String>,
    ids: HashMap<String, usize>,
}

impl LabelSet {
    /// Builds the label set of a (training) split.
    ///
    /// ```
    /// use peft_data::{parse_conll_str, LabelSet, TagScheme};
    /// let train = parse_conll_str("Paris B-LOC\nis O\nnice O\n", "train", TagScheme::Auto)?;
    /// let labels = LabelSet::from_sentences(&train);
    /// assert_eq!(labels.names(), ["O", "B-LOC", "I-LOC"]);
    /// # Ok::<(), peft_data::DataError>(())
    /// ```
    pub fn from_sentences(sentences: &[Sentence]) -> Self {
        // (type or raw tag, rank) sorts B before I, and non-IOB tags after both.
        let mut keys: BTreeSet<(String, u8)> = BTreeSet::new();
        for tag in sentences.iter().flat_map(|s| &s.tags) {
            match Tag::parse(tag) {
                Some(Tag::O) => {}
                Some(Tag::B(kind)) | Some(Tag::I(kind)) => {
                    keys.insert((kind.to_string(), 0));
                    keys.insert((kind.to_string(), 1));
                }
                None => {
                    keys.insert((tag.clone(), 2));
                }
            }
        }
        let names = std::iter::once("O".to_string())
            .chain(keys.into_iter().map(|(kind, rank)| match rank {
                0 => format!("B-{kind}"),
                1 => format!("I-{kind}"),
                _ => kind,
            }))
            .collect();
        Self::from_unique(names)
    }

    /// Builds a label set from names in id order; fails on duplicates or an empty list.
    pub fn from_names(names: Vec<String>) -> Result<Self> {
        if names.is_empty() {
            return Err(DataError::arg("labels", "expected at least one label"));
        }
        let mut seen = BTreeSet::new();
        for name in &names {
            if !seen.insert(name.as_str()) {
                return Err(DataError::arg(
                    "labels",
                    format!("label `{name}` occurs twice"),
                ));
            }
        }
        Ok(Self::from_unique(names))
    }

    fn from_unique(names: Vec<String>) -> Self {
        let ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Self { names, ids }
    }

    /// The id of a label.
    pub fn id(&self, label: &str) -> Option<usize> {
        self.ids.get(label).copied()
    }

    /// The name of a label id.
    pub fn name(&self, id: usize) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the set is empty (never true for sets built by this crate).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// All label names in id order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The labels as one comma-separated string, for messages.
    pub fn known(&self) -> String {
        self.names.join(", ")
    }

    /// The id to use on a continuation sub-token of a word labelled `id`: `I-X` for `B-X` when
    /// the set has `I-X`, else `id` itself.
    pub fn inside_id(&self, id: usize) -> usize {
        match self.name(id).and_then(Tag::parse) {
            Some(Tag::B(kind)) => self.id(&format!("I-{kind}")).unwrap_or(id),
            _ => id,
        }
    }

    /// Checks that every tag of another split (validation, test) is in this set.
    ///
    /// The error names the split, the first unknown label and its line.
    pub fn check_split(&self, sentences: &[Sentence], split: &str) -> Result<()> {
        for s in sentences {
            for (i, tag) in s.tags.iter().enumerate() {
                if self.id(tag).is_none() {
                    return Err(DataError::LabelAbsentFromTrain {
                        split: split.to_string(),
                        label: tag.clone(),
                        line: s.line + i,
                        known: self.known(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `id2label` as transformers writes it in `config.json`: `{"0": "O", "1": "B-LOC", ...}`.
    pub fn to_id2label(&self) -> BTreeMap<String, String> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), n.clone()))
            .collect()
    }

    /// `label2id` as transformers writes it in `config.json`: `{"O": 0, "B-LOC": 1, ...}`.
    pub fn to_label2id(&self) -> BTreeMap<String, usize> {
        self.ids.iter().map(|(n, &i)| (n.clone(), i)).collect()
    }

    /// Reads an `id2label` map; its keys must be exactly `"0"` to `"n-1"`, its labels unique.
    pub fn from_id2label(map: &BTreeMap<String, String>) -> Result<Self> {
        let mut slots: Vec<Option<String>> = vec![None; map.len()];
        for (key, label) in map {
            let id: usize = key.trim().parse().map_err(|_| DataError::Id2Label {
                reason: format!("key `{key}` is not a non-negative integer"),
            })?;
            let slot = slots.get_mut(id).ok_or_else(|| DataError::Id2Label {
                reason: format!("id {id} is out of range for {} labels", map.len()),
            })?;
            if slot.replace(label.clone()).is_some() {
                return Err(DataError::Id2Label {
                    reason: format!("id {id} is given twice"),
                });
            }
        }
        let names: Vec<String> = slots.into_iter().flatten().collect();
        if names.len() != map.len() {
            return Err(DataError::Id2Label {
                reason: "ids must be 0..n without gaps".to_string(),
            });
        }
        Self::from_names(names).map_err(|e| DataError::Id2Label {
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_conll_str, TagScheme};

    fn conll_labels() -> LabelSet {
        let text = "a B-PER\nb I-PER\nc O\nd B-ORG\n\ne B-MISC\nf B-LOC\ng I-LOC\n";
        LabelSet::from_sentences(&parse_conll_str(text, "t", TagScheme::Iob2).unwrap())
    }

    #[test]
    fn order_is_o_then_types_b_before_i() {
        let l = conll_labels();
        let expect = [
            "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER",
        ];
        assert_eq!(l.names(), expect);
        assert_eq!(l.id("B-ORG"), Some(5));
        assert_eq!(l.name(8), Some("I-PER"));
        assert_eq!(l.name(9), None);
        assert_eq!(l.inside_id(5), 6);
        assert_eq!(l.inside_id(0), 0);
    }

    #[test]
    fn id2label_round_trip() {
        let l = conll_labels();
        let map = l.to_id2label();
        assert_eq!(map["0"], "O");
        assert_eq!(map["8"], "I-PER");
        assert_eq!(LabelSet::from_id2label(&map).unwrap(), l);
        assert_eq!(l.to_label2id()["B-MISC"], 3);
    }

    #[test]
    fn id2label_with_many_labels_keeps_numeric_order() {
        let names: Vec<String> = (0..12).map(|i| format!("L{i}")).collect();
        let l = LabelSet::from_names(names.clone()).unwrap();
        let back = LabelSet::from_id2label(&l.to_id2label()).unwrap();
        assert_eq!(back.names(), names);
    }

    #[test]
    fn bad_id2label() {
        let map = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            LabelSet::from_id2label(&m).unwrap_err().to_string()
        };
        assert!(map(&[("0", "O"), ("2", "B-X")]).contains("out of range"));
        assert!(map(&[("0", "O"), ("x", "B-X")]).contains("key `x`"));
        assert!(map(&[("0", "O"), ("1", "O")]).contains("twice"));
        assert!(map(&[]).contains("at least one"));
    }
}
