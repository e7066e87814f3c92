//! Word-to-subword label alignment for token classification.
//!
//! Words are fed to the tokenizer pre-tokenized, so each sub-token knows its word (`word_ids`).
//! Labels follow Hugging Face's `run_ner.py`: special tokens get [`IGNORE_INDEX`] (-100); by default
//! only a word's first sub-token carries its label and the others are ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::conll::Sentence;
use crate::error::{DataError, Result};
use crate::labels::LabelSet;

/// Label value of positions the loss ignores (special tokens, continuation sub-tokens, padding).
pub const IGNORE_INDEX: i64 = -100;

/// How words and labels become sub-token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlignOptions {
    /// `false`: only the first sub-token of a word is labelled, the rest get -100.
    /// `true`: every sub-token gets its word's label, `B-X` becoming `I-X` after the first.
    pub label_all_subtokens: bool,
    /// Longest sequence, special tokens included; longer ones are cut at the end and keep their
    /// final special token (`[SEP]`). `None` disables truncation.
    pub max_len: Option<usize>,
}

impl Default for AlignOptions {
    /// First sub-token labelled, at most 512 tokens (BERT's position limit).
    fn default() -> Self {
        Self {
            label_all_subtokens: false,
            max_len: Some(512),
        }
    }
}

/// One encoded sentence, ready to batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    /// Sub-token ids, special tokens included.
    pub input_ids: Vec<u32>,
    /// Segment ids (all 0 for single sentences).
    pub token_type_ids: Vec<u32>,
    /// Label id per sub-token, or [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// The word each sub-token comes from; `None` for special tokens.
    pub word_ids: Vec<Option<u32>>,
    /// Number of words in the source sentence.
    pub num_words: usize,
    /// Words that lost all their sub-tokens to truncation.
    pub truncated_words: usize,
}

impl Encoded {
    /// Number of sub-tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no sub-tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Word-level tags from token-level predictions (see [`crate::word_tags`]).
    pub fn word_tags(&self, token_preds: &[u32], labels: &LabelSet) -> Result<Vec<String>> {
        crate::decode::word_tags(&self.word_ids, token_preds, self.num_words, labels)
    }
}

/// A tokenizer prepared for label alignment.
#[derive(Debug, Clone)]
pub struct Aligner {
    tokenizer: Tokenizer,
    options: AlignOptions,
    pad_id: u32,
}

impl Aligner {
    /// Wraps a tokenizer: its own padding is removed and its truncation replaced by
    /// `options.max_len` (tokenizer.json files such as all-MiniLM-L6-v2's ship with both set).
    ///
    /// The pad id is taken from the tokenizer's padding settings, else from a `[PAD]` or `<pad>`
    /// token, else 0.
    pub fn new(mut tokenizer: Tokenizer, options: AlignOptions) -> Result<Self> {
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        let truncation = match options.max_len {
            None => None,
            Some(max_len) => {
                let added = tokenizer
                    .get_post_processor()
                    .map_or(0, |p| p.added_tokens(false));
                if max_len <= added {
                    return Err(DataError::arg(
                        "max_len",
                        format!(
                            "{max_len} leaves no room for words: the tokenizer adds {added} \
                             special tokens; expected at least {}",
                            added + 1
                        ),
                    ));
                }
                Some(TruncationParams {
                    direction: TruncationDirection::Right,
                    max_length: max_len,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                })
            }
        };
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| DataError::tokenizer("setting truncation", e))?;
        Ok(Self {
            tokenizer,
            options,
            pad_id,
        })
    }

    /// Loads a `tokenizer.json` and wraps it (see [`Aligner::new`]).
    pub fn from_file(path: impl AsRef<Path>, options: AlignOptions) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let tokenizer = Tokenizer::from_bytes(bytes)
            .map_err(|e| DataError::tokenizer(format!("loading {}", path.display()), e))?;
        Self::new(tokenizer, options)
    }

    /// The options in force.
    pub fn options(&self) -> &AlignOptions {
        &self.options
    }

    /// The wrapped tokenizer (padding off, truncation as configured).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id to pad input ids with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Encodes a labelled sentence; a tag missing from `labels` is an error naming its line.
    pub fn encode(&self, sentence: &Sentence, labels: &LabelSet) -> Result<Encoded> {
        if sentence.tags.len() != sentence.words.len() {
            return Err(DataError::arg(
                "sentence",
                format!(
                    "line {}: {} words but {} tags",
                    sentence.line,
                    sentence.words.len(),
                    sentence.tags.len()
                ),
            ));
        }
        let word_labels = sentence
            .tags
            .iter()
            .enumerate()
            .map(|(i, tag)| {
                labels.id(tag).ok_or_else(|| DataError::UnknownLabel {
                    label: tag.clone(),
                    line: sentence.line + i,
                    known: labels.known(),
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        let context = || format!("encoding the sentence at line {}", sentence.line);
        let mut enc = self.encode_inner(&sentence.words, context)?;
        let mut prev = None;
        for (label, word) in enc.labels.iter_mut().zip(&enc.word_ids) {
            if let Some(w) = *word {
                let id = word_labels[w as usize];
                if prev != Some(w) {
                    *label = id as i64;
                } else if self.options.label_all_subtokens {
                    *label = labels.inside_id(id) as i64;
                }
            }
            prev = *word;
        }
        Ok(enc)
    }

    /// Encodes unlabelled words (for prediction): every label is [`IGNORE_INDEX`].
    pub fn encode_words(&self, words: &[String]) -> Result<Encoded> {
        self.encode_inner(words, || "encoding words".to_string())
    }

    /// Encodes a whole split, summing truncation counts.
    pub fn encode_all(&self, sentences: &[Sentence], labels: &LabelSet) -> Result<EncodedSplit> {
        let items = sentences
            .iter()
            .map(|s| self.encode(s, labels))
            .collect::<Result<Vec<_>>>()?;
        let truncated_words = items.iter().map(|e| e.truncated_words).sum();
        let truncated_sentences = items.iter().filter(|e| e.truncated_words > 0).count();
        Ok(EncodedSplit {
            items,
            truncated_words,
            truncated_sentences,
        })
    }

    fn encode_inner(&self, words: &[String], context: impl Fn() -> String) -> Result<Encoded> {
        let encoding = self
            .tokenizer
            .encode(words, true)
            .map_err(|e| DataError::tokenizer(context(), e))?;
        let word_ids = encoding.get_word_ids().to_vec();
        if let Some(bad) = word_ids
            .iter()
            .flatten()
            .find(|&&w| w as usize >= words.len())
        {
            return Err(DataError::tokenizer(
                context(),
                format!("word id {bad} out of range for {} words", words.len()),
            ));
        }
        let truncated_words = if encoding.get_overflowing().is_empty() {
            0
        } else {
            let kept = word_ids
                .iter()
                .flatten()
                .max()
                .map_or(0, |&w| w as usize + 1);
            words.len() - kept
        };
        Ok(Encoded {
            input_ids: encoding.get_ids().to_vec(),
            token_type_ids: encoding.get_type_ids().to_vec(),
            labels: vec![IGNORE_INDEX; word_ids.len()],
            word_ids,
            num_words: words.len(),
            truncated_words,
        })
    }
}

/// A whole split, encoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedSplit {
    /// One entry per sentence, in input order.
    pub items: Vec<Encoded>,
    /// Words lost to truncation across the split (the trainer should warn when non-zero).
    pub truncated_words: usize,
    /// Sentences that lost at least one word.
    pub truncated_sentences: usize,
}

impl EncodedSplit {
    /// Sub-token length of each item, for [`crate::Batcher`].
    pub fn lengths(&self) -> Vec<usize> {
        self.items.iter().map(Encoded::len).collect()
    }
}
