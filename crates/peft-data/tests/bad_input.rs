//! Bad input must produce an error that names the file, line and what was expected.

mod common;

use std::path::PathBuf;

use peft_data::{
    parse_conll_str, read_conll, AlignOptions, Aligner, Batcher, Collator, DataError, Encoded,
    LabelSet, TagScheme,
};

fn write(dir: &tempfile::TempDir, name: &str, text: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn malformed_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "train.txt", b"EU NNP B-ORG\r\nrejects O\n\nlonely\n");
    let err = read_conll(&path, TagScheme::Auto).unwrap_err();
    assert!(matches!(
        err,
        DataError::Columns {
            line: 4,
            found: 1,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!(
            "{}:4: expected at least 2 whitespace-separated columns (token ... tag), found 1",
            path.display()
        )
    );
}

#[test]
fn invalid_tag_names_file_and_line() {
    let text = "EU B-ORG\nrejects O\n\nPeter S-PER\n";
    let err = parse_conll_str(text, "data/train.txt", TagScheme::Auto).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data/train.txt:4: invalid tag `S-PER`: expected `O`, `B-<type>` or `I-<type>` (IOB1/IOB2)"
    );
    for bad in ["B-", "per", "0"] {
        let err = parse_conll_str(&format!("x {bad}\n"), "t", TagScheme::Iob1).unwrap_err();
        assert!(
            matches!(err, DataError::InvalidTag { line: 1, .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn label_absent_from_train() {
    let train = parse_conll_str("EU B-ORG\nPeter B-PER\n", "train.txt", TagScheme::Auto).unwrap();
    let valid_text = "x O\n\ny O\nFoo B-FOO\nbar I-FOO\n";
    let valid = parse_conll_str(valid_text, "valid.txt", TagScheme::Auto).unwrap();
    let labels = LabelSet::from_sentences(&train);
    let err = labels.check_split(&valid, "valid.txt").unwrap_err();
    assert_eq!(
        err.to_string(),
        "valid.txt: label `B-FOO` (first at line 4) does not occur in the training split; \
         known labels: O, B-ORG, I-ORG, B-PER, I-PER"
    );
    // I-X is known when only B-X was seen in training.
    let valid = parse_conll_str("EU I-ORG\n", "v", TagScheme::Iob2);
    assert!(valid.is_err(), "I-ORG after sentence start is not IOB2");
    let valid = parse_conll_str("EU B-ORG\nx I-ORG\n", "v", TagScheme::Iob2).unwrap();
    labels.check_split(&valid, "v").unwrap();
}

#[test]
fn empty_dataset() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("train.txt", &b"-DOCSTART- -X- -X- O\n\n\n"[..]),
        ("zero.txt", b""),
    ] {
        let path = write(&dir, name, text);
        let err = read_conll(&path, TagScheme::Auto).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("empty dataset: {} holds no sentences", path.display())
        );
    }
}

#[test]
fn missing_file() {
    let err = read_conll("data/x.txt", TagScheme::Auto).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read data/x.txt: No such file"),
        "{err}"
    );
    let err = Aligner::from_file("nope/tokenizer.json", AlignOptions::default()).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("cannot read nope/tokenizer.json"));
}

#[test]
fn invalid_utf8_names_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "latin1.txt", b"a O\n\nM\xfcnchen B-LOC\n");
    let err = read_conll(&path, TagScheme::Auto).unwrap_err();
    assert!(matches!(err, DataError::Utf8 { line: 3, .. }), "{err}");
}

#[test]
fn bad_tokenizer_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "tokenizer.json", b"{not json");
    let err = Aligner::from_file(&path, AlignOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn unknown_label_when_encoding() {
    let aligner = Aligner::new(common::tiny_tokenizer(), AlignOptions::default()).unwrap();
    let labels = LabelSet::from_names(vec!["O".into()]).unwrap();
    let s = parse_conll_str("a O\nParis B-LOC\n", "t", TagScheme::Auto).unwrap();
    let err = aligner.encode(&s[0], &labels).unwrap_err();
    assert!(
        err.to_string().starts_with("line 2: label `B-LOC`"),
        "{err}"
    );
}

#[test]
fn options_out_of_range_are_errors() {
    let opts = AlignOptions {
        max_len: Some(2),
        ..Default::default()
    };
    let err = Aligner::new(common::tiny_tokenizer(), opts).unwrap_err();
    assert!(err.to_string().contains("expected at least 3"), "{err}");
    assert!(Batcher::new(vec![1, 2], 0, 0).is_err());
    assert!(Batcher::new(vec![1, 2], 1, 0)
        .unwrap()
        .with_bucket_factor(0)
        .is_err());
    let items = vec![Encoded::default()];
    assert!(Collator::new(0).collate(&items, &[1]).is_err());
    let broken = Encoded {
        input_ids: vec![1, 2],
        ..Default::default()
    };
    assert!(Collator::new(0).collate(&[broken], &[0]).is_err());
    let c = Collator {
        pad_id: 0,
        pad_to_multiple_of: Some(0),
    };
    assert!(c.collate(&items, &[0]).is_err());
}
