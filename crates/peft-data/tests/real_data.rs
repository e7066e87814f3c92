//! Checks on the real CoNLL-2003 files and the all-MiniLM-L6-v2 tokenizer, when
//! `scripts/setup-assets.sh` has fetched them; skipped with a note otherwise.

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_data::{read_conll, AlignOptions, Aligner, Batcher, LabelSet, TagScheme};

fn conll_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/data/conll2003");
    dir.join("train.txt").is_file().then_some(dir)
}

/// `tokenizer.json` of all-MiniLM-L6-v2 in the Hugging Face cache, if present.
fn minilm_tokenizer() -> Option<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub"))
        })?;
    let snapshots = hub.join("models--sentence-transformers--all-MiniLM-L6-v2/snapshots");
    std::fs::read_dir(snapshots)
        .ok()?
        .flatten()
        .map(|e| e.path().join("tokenizer.json"))
        .find(|p| p.is_file())
}

#[test]
fn conll2003_splits_and_labels() {
    let Some(dir) = conll_dir() else {
        eprintln!("note: skipped, assets/data/conll2003 absent (run scripts/setup-assets.sh)");
        return;
    };
    // Strict IOB2: fails if any I-X starts an entity.
    let read = |name: &str| read_conll(dir.join(name), TagScheme::Iob2).unwrap();
    let (train, valid, test) = (read("train.txt"), read("valid.txt"), read("test.txt"));
    assert_eq!(
        (train.len(), valid.len(), test.len()),
        (14_041, 3_250, 3_453)
    );
    let labels = LabelSet::from_sentences(&train);
    let expect = [
        "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER",
    ];
    assert_eq!(labels.names(), expect);
    labels.check_split(&valid, "valid.txt").unwrap();
    labels.check_split(&test, "test.txt").unwrap();
    let words: usize = train.iter().map(|s| s.len()).sum();
    assert_eq!(words, 203_621);
}

#[test]
fn conll2003_encodes_with_minilm() {
    let (Some(dir), Some(tok)) = (conll_dir(), minilm_tokenizer()) else {
        eprintln!("note: skipped, CoNLL-2003 or the MiniLM tokenizer is absent");
        return;
    };
    let train = read_conll(dir.join("train.txt"), TagScheme::Auto).unwrap();
    let labels = LabelSet::from_sentences(&train);
    for max_len in [512, 128] {
        for label_all_subtokens in [false, true] {
            let opts = AlignOptions {
                label_all_subtokens,
                max_len: Some(max_len),
            };
            let aligner = Aligner::from_file(&tok, opts).unwrap();
            assert_eq!(aligner.pad_id(), 0);
            let start = Instant::now();
            let split = aligner.encode_all(&train, &labels).unwrap();
            let elapsed = start.elapsed();
            let lengths = split.lengths();
            let tokens: usize = lengths.iter().sum();
            let longest = lengths.iter().max().copied().unwrap_or(0);
            println!(
                "encode train (max_len {max_len}, label_all_subtokens {label_all_subtokens}): \
                 {} sentences, {tokens} sub-tokens, longest {longest}, {} words truncated in {} \
                 sentences, {:.2?}",
                split.items.len(),
                split.truncated_words,
                split.truncated_sentences,
                elapsed
            );
            assert!(longest <= max_len);
            // Every word keeps a labelled first sub-token unless truncated.
            let labelled: usize = split
                .items
                .iter()
                .map(|e| e.labels.iter().filter(|&&l| l >= 0).count())
                .sum();
            if !label_all_subtokens {
                assert_eq!(labelled + split.truncated_words, 203_621);
            }
            let batcher = Batcher::new(lengths, 32, 0).unwrap();
            assert_eq!(batcher.epoch_batches(0).concat().len(), 14_041);
        }
    }
}
