//! Tests of the conlleval-compatible entity scores.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn check(s: &TypeScores, p: f64, r: f64, f: f64, counts: (usize, usize, usize)) {
    assert!(close(s.precision, p), "precision {} != {p}", s.precision);
    assert!(close(s.recall, r), "recall {} != {r}", s.recall);
    assert!(close(s.f1, f), "f1 {} != {f}", s.f1);
    assert_eq!((s.gold, s.predicted, s.correct), counts);
}

/// conlleval's edge cases. The numbers were worked out by hand and agree with the original
/// `conlleval` Perl script (version 2004-01-26): "processed 13 tokens with 6 phrases; found: 8
/// phrases; correct: 2. accuracy: 53.85%; precision: 25.00%; recall: 33.33%; FB1: 28.57".
/// (The implementation also reproduced the script's counts exactly on 300 random sentences
/// mixing B/I/E/O, bare, bracket and hyphenated-type tags.)
#[test]
fn conlleval_edge_cases() {
    let gold = vec![
        // A chunk spanning two tokens and a LOC chunk at the end of the sentence.
        vec!["B-PER", "I-PER", "O", "B-LOC", "I-LOC"],
        // A one-token chunk at the end of the sentence.
        vec!["O", "B-ORG"],
        vec!["B-MISC", "I-MISC"],
        // IOB1: I- starts a chunk; B- separates two adjacent chunks of one type.
        vec!["I-PER", "I-PER", "B-PER", "O"],
    ];
    let pred = vec![
        // I-PER at sentence start opens a chunk equal to gold's PER [0, 1];
        // the type change B-LOC I-ORG splits into LOC [3] and ORG [4].
        vec!["I-PER", "I-PER", "O", "B-LOC", "I-ORG"],
        vec!["O", "B-ORG"],
        // B after B: two one-token chunks.
        vec!["B-MISC", "B-MISC"],
        // PER [0] and PER [2, 3] (I-PER after O starts a chunk).
        vec!["I-PER", "O", "I-PER", "I-PER"],
    ];
    let s = entity_scores(&gold, &pred).unwrap();
    check(&s.overall, 0.25, 1.0 / 3.0, 2.0 / 7.0, (6, 8, 2));
    check(
        &s.per_type["PER"],
        1.0 / 3.0,
        1.0 / 3.0,
        1.0 / 3.0,
        (3, 3, 1),
    );
    check(&s.per_type["LOC"], 0.0, 0.0, 0.0, (1, 1, 0));
    check(&s.per_type["ORG"], 0.5, 1.0, 2.0 / 3.0, (1, 2, 1));
    check(&s.per_type["MISC"], 0.0, 0.0, 0.0, (1, 2, 0));
    assert_eq!(s.per_type.len(), 4);
    assert_eq!(s.tokens, 13);
    assert!(close(s.token_accuracy, 7.0 / 13.0));
    assert!(close(s.macro_f1, 0.25));
}

/// Checked against `seqeval` 1.2.2 in default mode (`precision_score`, `recall_score`,
/// `f1_score`, `accuracy_score`, `classification_report`): micro P 0.6, R 0.5, F1 0.545455,
/// accuracy 0.8125, macro F1 0.625; per type LOC 1/1/1 (support 1), MISC 0/0/0 (2),
/// ORG 1/1/1 (1), PER 0.5/0.5/0.5 (2). The conlleval script agrees.
#[test]
fn matches_seqeval_default_mode() {
    let gold = vec![
        vec!["O", "O", "B-MISC", "I-MISC", "B-MISC", "O", "O"],
        vec!["B-PER", "I-PER", "O", "B-LOC"],
        vec!["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],
    ];
    let pred = vec![
        vec!["O", "O", "B-MISC", "I-MISC", "I-MISC", "O", "O"],
        vec!["B-PER", "O", "O", "B-LOC"],
        vec!["B-ORG", "I-ORG", "I-ORG", "O", "I-PER"],
    ];
    let s = entity_scores(&gold, &pred).unwrap();
    check(&s.overall, 0.6, 0.5, 6.0 / 11.0, (6, 5, 3));
    check(&s.per_type["LOC"], 1.0, 1.0, 1.0, (1, 1, 1));
    check(&s.per_type["MISC"], 0.0, 0.0, 0.0, (2, 1, 0));
    check(&s.per_type["ORG"], 1.0, 1.0, 1.0, (1, 1, 1));
    check(&s.per_type["PER"], 0.5, 0.5, 0.5, (2, 2, 1));
    assert!(close(s.token_accuracy, 0.8125));
    assert!(close(s.macro_f1, 0.625));
}

#[test]
fn a_prediction_must_end_where_gold_ends() {
    // Same start and type, but the predicted chunk is shorter: not correct.
    let s = entity_scores(&[vec!["B-PER", "I-PER"]], &[vec!["B-PER", "O"]]).unwrap();
    assert_eq!(s.overall.correct, 0);
    // ... or longer.
    let s = entity_scores(&[vec!["B-PER", "O"]], &[vec!["B-PER", "I-PER"]]).unwrap();
    assert_eq!(s.overall.correct, 0);
    // A chunk never continues into the next sentence.
    let gold = vec![vec!["O", "B-PER"], vec!["I-PER", "O"]];
    let s = entity_scores(&gold, &gold).unwrap();
    check(&s.overall, 1.0, 1.0, 1.0, (2, 2, 2));
}

#[test]
fn iob1_and_iob2_give_the_same_scores() {
    let iob1 = vec![vec!["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]];
    let iob2 = vec![vec!["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]];
    let pred = vec![vec!["B-PER", "I-PER", "I-PER", "O", "B-LOC", "B-ORG"]];
    let a = entity_scores(&iob1, &pred).unwrap();
    let b = entity_scores(&iob2, &pred).unwrap();
    assert_eq!(a.overall, b.overall);
    assert_eq!(a.per_type, b.per_type);
    check(&a.overall, 2.0 / 3.0, 0.5, 4.0 / 7.0, (4, 3, 2));
}

#[test]
fn owned_strings_and_empty_input() {
    let gold: Vec<Vec<String>> = vec![vec!["B-X".into(), "O".into()]];
    let s = entity_scores(&gold, &gold).unwrap();
    check(&s.overall, 1.0, 1.0, 1.0, (1, 1, 1));
    let empty: Vec<Vec<String>> = Vec::new();
    let s = entity_scores(&empty, &empty).unwrap();
    assert_eq!(s, EntityScores::default());
    let s = entity_scores(&[vec!["O", "O"]], &[vec!["O", "O"]]).unwrap();
    check(&s.overall, 0.0, 0.0, 0.0, (0, 0, 0));
    assert_eq!(s.token_accuracy, 1.0);
}

#[test]
fn shape_mismatch_is_an_error() {
    let err = entity_scores(&[vec!["O"], vec!["O", "O"]], &[vec!["O"], vec!["O"]]).unwrap_err();
    assert!(matches!(err, TrainError::LabelShape { .. }));
    assert!(err.to_string().contains("sentence 1"), "{err}");
    let err = entity_scores(&[vec!["O"]], &[vec!["O"], vec!["O"]]).unwrap_err();
    assert!(err.to_string().contains("1 gold sentences but 2"), "{err}");
}

#[test]
fn scores_serialize() {
    let s = entity_scores(&[vec!["B-PER"]], &[vec!["B-PER"]]).unwrap();
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"per_type\":{\"PER\""), "{json}");
    let back: EntityScores = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}
