//! Word-to-subword label alignment with a tiny in-code WordPiece tokenizer.

mod common;

use common::{id, tiny_tokenizer, words};
use peft_data::{
    parse_conll_str, AlignOptions, Aligner, LabelSet, Sentence, TagScheme, IGNORE_INDEX,
};
use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};

const X: i64 = IGNORE_INDEX;

fn sentence(text: &str) -> (Sentence, LabelSet) {
    let s = parse_conll_str(text, "t", TagScheme::Auto).unwrap();
    let labels = LabelSet::from_sentences(&s);
    (s.into_iter().next().unwrap(), labels)
}

fn aligner(label_all_subtokens: bool, max_len: Option<usize>) -> Aligner {
    let opts = AlignOptions {
        label_all_subtokens,
        max_len,
    };
    Aligner::new(tiny_tokenizer(), opts).unwrap()
}

fn lid(labels: &LabelSet, name: &str) -> i64 {
    labels.id(name).unwrap() as i64
}

#[test]
fn first_subtoken_labelled_others_ignored() {
    let (s, l) = sentence("Peter B-PER\nBlackburn I-PER\nin O\nJohns B-PER\n");
    let enc = aligner(false, None).encode(&s, &l).unwrap();
    let ids = [
        "[CLS]", "peter", "black", "##burn", "in", "jo", "##hn", "##s", "[SEP]",
    ];
    assert_eq!(enc.input_ids, ids.map(id));
    assert_eq!(enc.token_type_ids, [0; 9]);
    let word_ids = [
        None,
        Some(0),
        Some(1),
        Some(1),
        Some(2),
        Some(3),
        Some(3),
        Some(3),
        None,
    ];
    assert_eq!(enc.word_ids, word_ids);
    let (b, i, o) = (lid(&l, "B-PER"), lid(&l, "I-PER"), lid(&l, "O"));
    assert_eq!(enc.labels, [X, b, i, X, o, b, X, X, X]);
    assert_eq!((enc.num_words, enc.truncated_words), (4, 0));
}

#[test]
fn all_subtokens_labelled_with_b_turned_into_i() {
    let (s, l) = sentence("Peter B-PER\nBlackburn I-PER\nin O\nJohns B-PER\n");
    let enc = aligner(true, None).encode(&s, &l).unwrap();
    let (b, i, o) = (lid(&l, "B-PER"), lid(&l, "I-PER"), lid(&l, "O"));
    assert_eq!(enc.labels, [X, b, i, i, o, b, i, i, X]);
}

#[test]
fn pre_tokenizer_splits_stay_in_their_word() {
    // "U.S." is split by the BERT pre-tokenizer into u . s . but remains word 1.
    let (s, l) = sentence("in O\nU.S. B-LOC\nzzz O\n");
    let enc = aligner(false, None).encode(&s, &l).unwrap();
    let ids = ["[CLS]", "in", "u", ".", "s", ".", "[UNK]", "[SEP]"];
    assert_eq!(enc.input_ids, ids.map(id));
    let w = |i| Some(i);
    let word_ids = [None, w(0), w(1), w(1), w(1), w(1), w(2), None];
    assert_eq!(enc.word_ids, word_ids);
    let (b, o) = (lid(&l, "B-LOC"), lid(&l, "O"));
    assert_eq!(enc.labels, [X, o, b, X, X, X, o, X]);
}

#[test]
fn truncation_keeps_sep_and_counts_lost_words() {
    let (s, l) = sentence("EU B-ORG\nrejects O\nGerman B-MISC\ncall O\nto O\nboycott O\n");
    // Sub-tokens: [CLS] eu rejects german call to boycott [SEP] = 8.
    for label_all in [false, true] {
        let enc = aligner(label_all, Some(5)).encode(&s, &l).unwrap();
        let ids = ["[CLS]", "eu", "rejects", "german", "[SEP]"];
        assert_eq!(enc.input_ids, ids.map(id));
        assert_eq!(enc.word_ids.last(), Some(&None));
        assert_eq!(enc.labels.len(), 5);
        assert_eq!(*enc.labels.last().unwrap(), X);
        assert_eq!(enc.truncated_words, 3);
    }
    // Exactly fitting: nothing lost.
    let enc = aligner(false, Some(8)).encode(&s, &l).unwrap();
    assert_eq!((enc.len(), enc.truncated_words), (8, 0));
}

#[test]
fn truncation_inside_a_word_loses_no_word() {
    let (s, l) = sentence("Peter B-PER\nBlackburn I-PER\n");
    // [CLS] peter black ##burn [SEP] cut to 4: "Blackburn" keeps its first sub-token.
    let enc = aligner(true, Some(4)).encode(&s, &l).unwrap();
    assert_eq!(enc.input_ids, ["[CLS]", "peter", "black", "[SEP]"].map(id));
    assert_eq!(enc.truncated_words, 0);
}

#[test]
fn tokenizer_padding_and_truncation_are_replaced() {
    let mut tok = tiny_tokenizer();
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(32),
        pad_id: 7,
        ..Default::default()
    }));
    tok.with_truncation(Some(TruncationParams {
        max_length: 4,
        ..Default::default()
    }))
    .unwrap();
    let a = Aligner::new(tok, AlignOptions::default()).unwrap();
    assert_eq!(
        a.pad_id(),
        7,
        "pad id comes from the tokenizer's padding settings"
    );
    let (s, l) = sentence("EU B-ORG\nrejects O\nGerman B-MISC\ncall O\nto O\nboycott O\n");
    let enc = a.encode(&s, &l).unwrap();
    assert_eq!(enc.len(), 8);
    assert!(a.tokenizer().get_padding().is_none());
    // Without padding settings the pad id is the [PAD] token's.
    assert_eq!(aligner(false, None).pad_id(), id("[PAD]"));
}

#[test]
fn encode_words_for_prediction() {
    let a = aligner(false, Some(4));
    let enc = a.encode_words(&words("Peter Blackburn in Paris")).unwrap();
    assert_eq!(enc.labels, [X; 4]);
    assert_eq!(enc.truncated_words, 2);
    let l = LabelSet::from_names(["O", "B-PER", "I-PER"].map(String::from).to_vec()).unwrap();
    let tags = enc.word_tags(&[0, 1, 2, 0], &l).unwrap();
    assert_eq!(tags, ["B-PER", "I-PER", "O", "O"]);
}

#[test]
fn encode_all_sums_truncation() {
    let text = "EU B-ORG\nrejects O\nGerman B-MISC\n\nPeter B-PER\n\nto O\nboycott O\nlamb O\n";
    let s = parse_conll_str(text, "t", TagScheme::Auto).unwrap();
    let l = LabelSet::from_sentences(&s);
    let split = aligner(false, Some(3)).encode_all(&s, &l).unwrap();
    assert_eq!(split.lengths(), [3, 3, 3]);
    assert_eq!((split.truncated_words, split.truncated_sentences), (4, 2));
}

#[test]
fn word_tags_round_trip_through_labels() {
    let (s, l) = sentence("Peter B-PER\nBlackburn I-PER\nin O\nParis B-LOC\n");
    for label_all in [false, true] {
        let enc = aligner(label_all, None).encode(&s, &l).unwrap();
        let preds: Vec<u32> = enc.labels.iter().map(|&x| x.max(0) as u32).collect();
        assert_eq!(enc.word_tags(&preds, &l).unwrap(), s.tags);
    }
}
