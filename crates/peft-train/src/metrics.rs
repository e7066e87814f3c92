//! Entity-level precision, recall and F1 with the semantics of the CoNLL `conlleval` script.
//!
//! Tags are split at the first `-` into a chunk tag and a type (`B-PER` is `B` and `PER`;
//! `O` has no type). Chunks start and end by conlleval's `startOfChunk`/`endOfChunk` rules, so
//! IOB2 and IOB1 input are both accepted: an `I-X` after `O` or after another type starts a new
//! chunk. A predicted chunk is correct when it starts and ends where a gold chunk does, with the
//! same type. Sentences are separated by a boundary, as conlleval's empty lines, so no chunk
//! crosses a sentence. For IOB1/IOB2 input the scores equal `seqeval`'s default mode.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Counts and scores for one entity type (or for all types together).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeScores {
    /// Correct predicted chunks / predicted chunks (0 when nothing was predicted).
    pub precision: f64,
    /// Correct predicted chunks / gold chunks (0 when there is no gold chunk).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
    /// Number of gold chunks (the support).
    pub gold: usize,
    /// Number of predicted chunks.
    pub predicted: usize,
    /// Number of predicted chunks that exactly match a gold chunk.
    pub correct: usize,
}

impl TypeScores {
    fn from_counts(gold: usize, predicted: usize, correct: usize) -> Self {
        let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        let precision = ratio(correct, predicted);
        let recall = ratio(correct, gold);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            f1,
            gold,
            predicted,
            correct,
        }
    }
}

/// Entity-level scores of a prediction against gold labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityScores {
    /// Micro average over all chunks (conlleval's overall line).
    pub overall: TypeScores,
    /// Scores per entity type, sorted by type name.
    pub per_type: BTreeMap<String, TypeScores>,
    /// Unweighted mean F1 over the types in `per_type`.
    pub macro_f1: f64,
    /// Fraction of tokens whose whole tag is right.
    pub token_accuracy: f64,
    /// Number of tokens scored.
    pub tokens: usize,
}

/// The chunk tag and type of a label: `B-PER` gives `("B", "PER")`, `O` gives `("O", "")`.
fn split_tag(tag: &str) -> (&str, &str) {
    tag.split_once('-').unwrap_or((tag, ""))
}

/// conlleval's `endOfChunk`: did a chunk end between the previous and the current token?
fn end_of_chunk(prev_tag: &str, tag: &str, prev_type: &str, ty: &str) -> bool {
    matches!(
        (prev_tag, tag),
        ("B", "B") | ("B", "O") | ("I", "B") | ("I", "O") | ("E", "E") | ("E", "I") | ("E", "O")
    ) || (prev_tag != "O" && prev_tag != "." && prev_type != ty)
        || prev_tag == "]"
        || prev_tag == "["
}

/// conlleval's `startOfChunk`: did a chunk start at the current token?
fn start_of_chunk(prev_tag: &str, tag: &str, prev_type: &str, ty: &str) -> bool {
    matches!(
        (prev_tag, tag),
        ("B", "B") | ("I", "B") | ("O", "B") | ("O", "I") | ("E", "E") | ("E", "I") | ("O", "E")
    ) || (tag != "O" && tag != "." && prev_type != ty)
        || tag == "["
        || tag == "]"
}

/// Per-type chunk counts: (gold, predicted, correct).
type Counts = BTreeMap<String, (usize, usize, usize)>;

/// conlleval's main loop state.
struct Scorer<'a> {
    last: [(&'a str, &'a str); 2],
    in_correct: bool,
    counts: Counts,
    correct_tags: usize,
    tokens: usize,
}

impl<'a> Scorer<'a> {
    fn new() -> Self {
        Self {
            last: [("O", ""); 2],
            in_correct: false,
            counts: Counts::new(),
            correct_tags: 0,
            tokens: 0,
        }
    }

    /// One token (or a sentence boundary when `boundary`), gold then guessed tag.
    fn push(&mut self, gold: (&'a str, &'a str), guess: (&'a str, &'a str), boundary: bool) {
        let [(lc, lct), (lg, lgt)] = self.last;
        let ((c, ct), (g, gt)) = (gold, guess);
        let end_c = end_of_chunk(lc, c, lct, ct);
        let end_g = end_of_chunk(lg, g, lgt, gt);
        if self.in_correct {
            if end_c && end_g && lgt == lct {
                self.in_correct = false;
                self.counts.entry(lct.to_string()).or_default().2 += 1;
            } else if end_c != end_g || gt != ct {
                self.in_correct = false;
            }
        }
        let start_c = start_of_chunk(lc, c, lct, ct);
        let start_g = start_of_chunk(lg, g, lgt, gt);
        if start_c && start_g && gt == ct {
            self.in_correct = true;
        }
        if start_c {
            self.counts.entry(ct.to_string()).or_default().0 += 1;
        }
        if start_g {
            self.counts.entry(gt.to_string()).or_default().1 += 1;
        }
        if !boundary {
            if c == g && ct == gt {
                self.correct_tags += 1;
            }
            self.tokens += 1;
        }
        self.last = [gold, guess];
    }

    fn finish(mut self) -> EntityScores {
        if self.in_correct {
            let (_, lct) = self.last[0];
            self.counts.entry(lct.to_string()).or_default().2 += 1;
        }
        let (mut gold, mut predicted, mut correct) = (0, 0, 0);
        let mut per_type = BTreeMap::new();
        for (ty, (g, p, c)) in self.counts {
            gold += g;
            predicted += p;
            correct += c;
            per_type.insert(ty, TypeScores::from_counts(g, p, c));
        }
        let macro_f1 = if per_type.is_empty() {
            0.0
        } else {
            per_type.values().map(|s| s.f1).sum::<f64>() / per_type.len() as f64
        };
        let token_accuracy = if self.tokens > 0 {
            self.correct_tags as f64 / self.tokens as f64
        } else {
            0.0
        };
        EntityScores {
            overall: TypeScores::from_counts(gold, predicted, correct),
            per_type,
            macro_f1,
            token_accuracy,
            tokens: self.tokens,
        }
    }
}

/// Scores predicted tag sequences against gold ones, sentence by sentence.
///
/// `gold` and `pred` must have the same number of sentences and each sentence the same length;
/// otherwise a [`TrainError::LabelShape`] names the first sentence that differs.
///
/// ```
/// use peft_train::metrics::entity_scores;
/// let gold = vec![vec!["B-PER", "I-PER", "O", "B-LOC"]];
/// let pred = vec![vec!["B-PER", "I-PER", "O", "B-ORG"]];
/// let s = entity_scores(&gold, &pred).unwrap();
/// assert_eq!(s.overall.correct, 1);
/// assert_eq!(s.overall.f1, 0.5);
/// ```
pub fn entity_scores<G, P>(gold: &[Vec<G>], pred: &[Vec<P>]) -> Result<EntityScores>
where
    G: AsRef<str>,
    P: AsRef<str>,
{
    if gold.len() != pred.len() {
        return Err(TrainError::LabelShape {
            message: format!(
                "{} gold sentences but {} predicted sentences",
                gold.len(),
                pred.len()
            ),
        });
    }
    if let Some((i, (g, p))) = gold
        .iter()
        .zip(pred)
        .enumerate()
        .find(|(_, (g, p))| g.len() != p.len())
    {
        return Err(TrainError::LabelShape {
            message: format!(
                "sentence {i} has {} gold tags but {} predicted tags",
                g.len(),
                p.len()
            ),
        });
    }
    let mut scorer = Scorer::new();
    for (g_sent, p_sent) in gold.iter().zip(pred) {
        for (g, p) in g_sent.iter().zip(p_sent) {
            scorer.push(split_tag(g.as_ref()), split_tag(p.as_ref()), false);
        }
        scorer.push(("O", ""), ("O", ""), true);
    }
    Ok(scorer.finish())
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
