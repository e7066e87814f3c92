//! Mapping token-level predictions back to word-level tags (for evaluation and prediction).

use crate::error::{DataError, Result};
use crate::labels::LabelSet;

/// The tag given to words that lost all their sub-tokens to truncation.
pub const OUTSIDE: &str = "O";

/// Word-level tags from token-level predictions: each word takes its first sub-token's
/// prediction; words with no sub-token (cut by truncation) get `O`.
///
/// `token_preds` holds one label id per sub-token and may be longer than `word_ids` (a padded
/// batch row); a shorter one, a word id `>= num_words` or an id outside `labels` is an error.
///
/// ```
/// use peft_data::{word_tags, LabelSet};
/// let labels = LabelSet::from_names(vec!["O".into(), "B-PER".into(), "I-PER".into()])?;
/// // [CLS] jo ##hn smith [SEP] [PAD]; the third word was truncated away.
/// let word_ids = [None, Some(0), Some(0), Some(1), None];
/// let preds = [0, 1, 0, 2, 0, 0];
/// assert_eq!(word_tags(&word_ids, &preds, 3, &labels)?, ["B-PER", "I-PER", "O"]);
/// # Ok::<(), peft_data::DataError>(())
/// ```
pub fn word_tags(
    word_ids: &[Option<u32>],
    token_preds: &[u32],
    num_words: usize,
    labels: &LabelSet,
) -> Result<Vec<String>> {
    if token_preds.len() < word_ids.len() {
        return Err(DataError::arg(
            "token_preds",
            format!(
                "expected at least {} predictions (one per sub-token), found {}",
                word_ids.len(),
                token_preds.len()
            ),
        ));
    }
    let mut tags: Vec<Option<&str>> = vec![None; num_words];
    for (word, &pred) in word_ids.iter().zip(token_preds) {
        let Some(w) = *word else { continue };
        let slot = tags.get_mut(w as usize).ok_or_else(|| {
            DataError::arg(
                "word_ids",
                format!("word id {w} is out of range for {num_words} words"),
            )
        })?;
        if slot.is_none() {
            let name = labels
                .name(pred as usize)
                .ok_or(DataError::LabelIdOutOfRange {
                    id: pred as usize,
                    len: labels.len(),
                })?;
            *slot = Some(name);
        }
    }
    Ok(tags
        .into_iter()
        .map(|t| t.unwrap_or(OUTSIDE).to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> LabelSet {
        LabelSet::from_names(vec!["O".into(), "B-X".into(), "I-X".into()]).unwrap()
    }

    #[test]
    fn errors_instead_of_panics() {
        let l = labels();
        let ids = [None, Some(0), None];
        assert!(word_tags(&ids, &[0, 1], 1, &l).is_err());
        assert!(word_tags(&ids, &[0, 7, 0], 1, &l)
            .unwrap_err()
            .to_string()
            .contains("label id 7"));
        assert!(word_tags(&[Some(3)], &[0], 1, &l).is_err());
    }

    #[test]
    fn empty_sentence() {
        assert!(word_tags(&[None, None], &[0, 0], 0, &labels())
            .unwrap()
            .is_empty());
    }
}
